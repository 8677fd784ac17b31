"""echoink-lite: GRPO with QLoRA for Qwen2.5-Omni audio + image reasoning (EchoInk-R1) on one GPU."""

import os as _os

# Before CUDA starts (importing the kit does not start it): let PyTorch's caching allocator grow segments in
# place instead of keeping fragmented blocks. On one H100 (2026-11-26) the allocator held 16.03 GB for a
# 12.37 GB allocated peak without it. A user's own setting wins.
if "PYTORCH_CUDA_ALLOC_CONF" not in _os.environ and "PYTORCH_ALLOC_CONF" not in _os.environ:
    _os.environ["PYTORCH_CUDA_ALLOC_CONF"] = "expandable_segments:True"
