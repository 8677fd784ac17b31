"""What a merge writes: every output tensor, its key, its dtype and the LoRA module merged into it.

``plan_tensors`` lists them from the base's shard headers alone, in a deterministic order (the base's shard
order, then key order). ``merge`` writes the output from this plan, and ``merge_verification`` checks the
written folder against the same plan, so both agree on what the output must hold; the merge math itself
(``merge.merged_weight``) is not shared, the verification recomputes it independently.

Thinker tensors take the key names transformers writes for the chosen format and the output dtype (floating
tensors only); the talker and token2wav of a full base keep their stored dtype (copied bit for bit).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .merge_base import Base, thinker_module_name, thinker_saved_name, torch_dtype_of
from .modeling import TORCH_DTYPES

DTYPE_CONFIG_NAMES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}
DTYPES = {short: TORCH_DTYPES[name] for short, name in DTYPE_CONFIG_NAMES.items()}


@dataclass
class PlannedTensor:
    """One output tensor: where it comes from, its output dtype and size, and the LoRA merged into it."""

    out_key: str
    base_key: str
    base_file: str
    dtype: torch.dtype | None  # None = keep the stored dtype
    nbytes: int
    numel: int
    lora: str | None  # adapter module merged into this tensor


def plan_tensors(base: Base, fmt: str, dtype: torch.dtype, mapping: dict[str, str]) -> list[PlannedTensor]:
    """Every tensor the output holds, in a deterministic order (base shard order, then key order)."""
    by_key = {v: k for k, v in mapping.items()}
    plan: list[PlannedTensor] = []
    for key, (shape, st_dtype, file) in base.shapes.items():
        numel = math.prod(shape)
        stored = torch_dtype_of(st_dtype)
        is_thinker = key.startswith("thinker.") if base.is_full else True
        if not is_thinker and fmt == "thinker":
            continue
        if is_thinker:
            bare = key[len("thinker."):] if base.is_full else key
            saved = thinker_saved_name(thinker_module_name(bare))
            out_key = ("thinker." + saved) if fmt == "full" else saved
            out_dtype = dtype if stored.is_floating_point else None
        else:  # talker / token2wav of a full checkpoint: copied bit for bit
            out_key, out_dtype = key, None
        itemsize = (out_dtype or stored).itemsize
        plan.append(PlannedTensor(out_key, key, file, out_dtype, numel * itemsize, numel, by_key.get(key)))
    # Keep the base's shard order, then key order inside a shard (deterministic output).
    order = {f: i for i, f in enumerate(base.files)}
    plan.sort(key=lambda p: (order[p.base_file], p.base_key))
    return plan
