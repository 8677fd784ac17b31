"""Which model `eval` and `infer` load, and how: a base checkpoint, base + LoRA adapter, or a merged folder.

Why it is shared: evaluation and inference must load the same model for the same flags, so ``--model``,
``--adapter``, ``--merged`` and ``--quantization`` mean one thing in both commands.

- **The base the adapter was trained on.** Without ``--model`` the base is the one the adapter's own
  ``adapter_config.json`` names (``resolve_base_model``), and the commands say so.
- **The quantization it was trained on.** The base is loaded as the adapter was trained (NF4 for a QLoRA
  run, read from the run's ``recipe.yaml``; ``resolve_quantization``), since the adapter learned to correct
  that base's weights; ``--quantization nf4|none`` overrides it.
- **Checked before it is attached.** ``load_model`` checks the adapter against the loaded base before PEFT
  loads it (``adapters.check_adapter_fits``, a one-line error on a mismatch); a missing or broken adapter
  folder fails before minutes of model loading.
"""

from __future__ import annotations

from pathlib import Path

import torch

from .adapters import adapter_base_model, load_adapter, training_quantization
from .eval_protocols import EvalError
from .modeling import ModelLoadError, load_processor, load_thinker

QUANTIZATION_CHOICES = ("auto", "nf4", "none")


def resolve_base_model(model: str | None, adapter: str | None, merged: str | None) -> tuple[str | None, str]:
    """(base model, where it came from). Without `model` an adapter's base is the one its own
    adapter_config.json names; a merged folder needs none (its processor may come from `model`)."""
    if model:
        return model, "--model"
    if adapter:
        base = adapter_base_model(adapter)
        if not base:
            raise EvalError(f"--model not given, and {Path(adapter) / 'adapter_config.json'} names no base_model_name_or_path. "
                            "Fix: pass --model with the base the adapter was trained on.")
        return base, f"{Path(adapter) / 'adapter_config.json'}"
    if merged:
        return None, "--merged"
    raise EvalError("nothing to evaluate: pass --model BASE (Hub id or folder), --adapter DIR (its base is read from "
                    "its adapter_config.json) or --merged DIR")


def resolve_quantization(choice: str, adapter: str | None):
    """(QuantizationSection or None, description) of the base the adapter is applied on.

    "auto": as the adapter was trained, read from its run's recipe.yaml (RUN/recipe.yaml beside RUN/adapter
    or RUN/checkpoints/step-N/adapter); without an adapter, or without that file, unquantized. "nf4": the
    kit's QLoRA default (4-bit NF4, double quantization). "none": unquantized.
    """
    from .recipe import QuantizationSection

    if choice == "nf4":
        return QuantizationSection(load_in_4bit=True), "nf4 (--quantization nf4)"
    if choice == "none" or not adapter:
        return None, "none" + (" (--quantization none)" if choice == "none" else "")
    section, recipe_file = training_quantization(adapter)
    if recipe_file is None:
        return None, (f"none (default: no recipe.yaml beside {adapter} or its run folder; pass --quantization nf4 "
                      "if it was trained on a 4-bit base)")
    if not section.load_in_4bit:
        return None, f"none, as trained ({recipe_file})"
    return section, f"{section.quant_type}, as trained ({recipe_file})"


def load_model(
    model: str | None,
    adapter: str | None = None,
    merged: str | None = None,
    dtype: str = "float32",
    quantization=None,
    device: str | torch.device | None = None,
    max_pixels: int = 256 * 28 * 28,
):
    """(model in eval mode, processor) for a base checkpoint, base + adapter, or a merged checkpoint.

    Shared by `eval` and `infer`. `quantization` is a recipe QuantizationSection for the base (None:
    unquantized). The adapter is checked against the loaded base before it is attached (one-line
    adapters.AdapterError on a mismatch). A merged folder is loaded as the base (thinker-only or full Omni
    both work); its processor is read from it when it holds one, else from `model`.
    """
    weights = merged or model
    if adapter:
        adapter_base_model(adapter)  # a missing or broken adapter folder fails before minutes of model loading
    try:
        processor = load_processor(weights, max_pixels=max_pixels)
    except ModelLoadError:
        if not (merged and model):
            raise
        processor = load_processor(model, max_pixels=max_pixels)
    thinker = load_thinker(weights, dtype=dtype, quantization=quantization, device=device)
    if adapter:
        thinker = load_adapter(thinker, adapter, base_name=weights,
                               fix="pass --model the base model the adapter was trained on")
    thinker.eval()
    return thinker, processor
