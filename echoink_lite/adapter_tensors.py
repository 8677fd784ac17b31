"""An adapter's LoRA tensors read whole, for merge and export: each module's A, B and scale.

Training, eval and infer never read them this way: PEFT loads the adapter into the model (adapters.load_adapter).
merge computes W + scale * B @ A itself (merge.py) and export copies the weights, so both need the tensors and
the scale PEFT would use: ``lora_alpha / r``, or ``lora_alpha / sqrt(r)`` with ``use_rslora``, per module under
``rank_pattern`` / ``alpha_pattern`` (peft 0.21, ``peft.tuners.lora.layer.LoraLayer.update_layer``). Settings a
plain W + scale * B @ A cannot represent (DoRA, ``modules_to_save``, ...) are refused, as are NaN or infinite
values (adapters.nonfinite_problem).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .adapters import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    LORA_KEY,
    AdapterError,
    lora_settings,
    lora_shapes,
    nonfinite_problem,
    pattern_value,
    read_adapter_config,
)


@dataclass
class LoraModule:
    module: str  # thinker module name, e.g. model.language_model.layers.0.self_attn.q_proj
    A: torch.Tensor  # [r, in]
    B: torch.Tensor  # [out, r]
    scale: float

    @property
    def rank(self) -> int:
        return int(self.A.shape[0])

    def delta(self) -> torch.Tensor:
        """scale * B @ A in fp32, shape [out, in]."""
        return (self.B.float() @ self.A.float()) * self.scale


@dataclass
class Adapter:
    path: Path
    config: dict[str, Any]
    modules: dict[str, LoraModule]

    @property
    def base(self) -> str | None:
        return self.config.get("base_model_name_or_path") or None


# adapter_config.json settings that a plain W + scale * B @ A merge cannot represent.
_NOT_PLAIN_LORA = ("use_dora", "modules_to_save", "trainable_token_indices", "lora_bias", "fan_in_fan_out", "layer_replication")


def read_adapter(adapter_dir: str | Path) -> Adapter:
    """Read a PEFT LoRA folder whole; refuse what a plain W + scale * B @ A merge cannot represent."""
    from safetensors import safe_open

    path = Path(adapter_dir)
    config = read_adapter_config(path)
    if config.get("peft_type", "LORA") != "LORA":
        raise AdapterError(f"{path}: a {config.get('peft_type')} adapter; echoink-lite merges and exports LoRA adapters only")
    unsupported = [name for name in _NOT_PLAIN_LORA if config.get(name)]
    if unsupported:
        raise AdapterError(f"{path}: {ADAPTER_CONFIG} sets {', '.join(unsupported)}; echoink-lite merges and exports "
                           "plain LoRA (W + scale * B @ A) only, as it trains it")
    shapes = lora_shapes(path)  # validates keys and A/B pairs from the header first
    tensors: dict[str, dict[str, torch.Tensor]] = {}
    with safe_open(str(path / ADAPTER_WEIGHTS), framework="pt") as f:
        for key in f.keys():
            m = LORA_KEY.match(key)
            tensors.setdefault(m["module"], {})[m["ab"]] = f.get_tensor(key)
    problem = nonfinite_problem(((f"{m}.lora_{ab}", t) for m, d in tensors.items() for ab, t in d.items()), path)
    if problem:
        raise AdapterError(problem)

    r0, alpha0, rank_pattern, alpha_pattern = lora_settings(config, path)
    modules: dict[str, LoraModule] = {}
    for module, shape in shapes.items():  # lora_shapes checked each rank against the config
        r = pattern_value(rank_pattern, module, r0)
        alpha = float(pattern_value(alpha_pattern, module, alpha0))
        scale = alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r
        modules[module] = LoraModule(module, tensors[module]["A"], tensors[module]["B"], scale)
    return Adapter(path, config, modules)
