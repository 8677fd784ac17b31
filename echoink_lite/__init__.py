"""echoink-lite: GRPO with QLoRA for Qwen2.5-Omni audio + image reasoning (EchoInk-R1) on one GPU.

Importing the package sets two things up before anything else runs:

- PyTorch's CUDA allocator may grow segments in place (below).
- One misleading library message is quieted before anything imports bitsandbytes: on CPUs with
  AVX512-BF16, bitsandbytes 0.50 logs "Failed to load CPU gemm_4bit_forward from kernels-community ...
  `pip install kernels`" at import time (logger `bitsandbytes.backends.cpu.ops`, in
  bitsandbytes/backends/cpu/ops.py) and then uses its own 4-bit CPU path, which is what the kit relies on
  (the optional `kernels` package would download a kernel from the Hub, which the kit never needs). Only
  that message is filtered; the logger's other records still show.
- transformers' false alarm about the Qwen2.5-Omni talker's token ids, logged on every load and save of a
  complete Omni config (`omni_config_warnings`, which says why it is wrong and what exactly is dropped).
"""

import logging
import os as _os

# Before CUDA starts (importing the kit does not start it): let PyTorch's caching allocator grow segments in
# place instead of keeping fragmented blocks. On one H100 (2026-11-26) the allocator held 16.03 GB for a
# 12.37 GB allocated peak without it. A user's own setting wins.
if "PYTORCH_CUDA_ALLOC_CONF" not in _os.environ and "PYTORCH_ALLOC_CONF" not in _os.environ:
    _os.environ["PYTORCH_CUDA_ALLOC_CONF"] = "expandable_segments:True"

_BNB_CPU_LOGGER = "bitsandbytes.backends.cpu.ops"
_BNB_KERNELS_HINT = "Failed to load CPU gemm_4bit_forward from kernels-community"


class _DropKernelsHint(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(_BNB_KERNELS_HINT)


logging.getLogger(_BNB_CPU_LOGGER).addFilter(_DropKernelsHint())

from . import omni_config_warnings as _omni_config_warnings  # noqa: E402  (stdlib only; imports nothing heavy)

_omni_config_warnings.install()
