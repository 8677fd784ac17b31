"""The attention mask each attention backend needs, for the decoder layers the engine calls directly.

The rollout's prompt pass and decode steps (rollout.py) and the loss pass (loss.py) call the language
model's decoder layers themselves (`thinker_forward.run_layers`), so transformers never builds their masks.
Each attention backend reads a mask differently (transformers 5.23):

- `sdpa` (`integrations/sdpa_attention.py`): a boolean mask, True = attend. With no mask and more than one
  query it sets `is_causal=True`; transformers' own `masking_utils.sdpa_mask` returns None for a plainly
  causal pattern for that reason (SDPA's fastest kernels need it).
- `eager` (`eager_attention_forward` in models/qwen2_5_omni/modeling_qwen2_5_omni.py) ADDS the mask to the
  scores. No mask means no causal mask, and a boolean mask adds 1 or 0, masking nothing. It needs
  `masking_utils.eager_mask`'s form: float, 0 = attend, the dtype's minimum = blocked, in the dtype of the
  hidden states.
- `flash_attention_2` takes a 2-D padding mask or None (`masking_utils.flash_attention_mask`), not the
  engine's 4-D patterns (a shared prompt prefix, a static cache with per-row prompt lengths). No test here
  can run it (it needs a GPU and the flash-attn package), so it is refused until a GPU test proves it.

The engine states what may attend to what as a boolean [B|1, 1, q, kv] (True = attend) or None (causal over
the tokens of this call only: a prompt pass), and `layer_mask` turns that into the backend's form, once per
call of the decoder stack. For every backend the recipe accepts (conftest's `backend_setup`), tests check that
greedy fp32 rollouts are token-identical to `generate` (test_rollout.py) and that loss-pass log-probs and
LoRA gradients equal the full `thinker(...)` forward (test_engine.py); tests/test_attention_backends.py
checks that every other value is refused.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch is imported where masks are built, so recipe validation (which reads EXACT_BACKENDS) stays light
    import torch

EXACT_BACKENDS = ("sdpa", "eager")  # proven exact against transformers by the backend_setup tests
UNTESTED_BACKENDS = {
    "flash_attention_2": "it reads 2-D padding masks, not the engine's prefix and static-cache masks, and no GPU "
                         "test has proven the engine exact with it yet",
}


class UnsupportedAttentionError(ValueError):
    """An attention backend the engine cannot build masks for (or has not been proven exact with)."""


def refusal(name: str, key: str = "model.attn_implementation") -> str | None:
    """One line saying why attention backend `name` cannot be used, naming the setting `key` and the fix
    (None when it can be used)."""
    if name in EXACT_BACKENDS:
        return None
    why = UNTESTED_BACKENDS.get(name, "the rollout engine and loss pass build attention masks for sdpa and eager only")
    return f"{key}={name} is not supported: {why}. Fix: set {key}=sdpa (the default) or eager; both are exact"


def backend(lm) -> str:
    """The attention backend of a language model (`config._attn_implementation`), checked to be one the engine
    builds masks for."""
    name = getattr(lm.config, "_attn_implementation", None) or "eager"
    problem = refusal(name, key="attn_implementation")
    if problem:
        raise UnsupportedAttentionError(problem)
    if "sliding_attention" in (getattr(lm.config, "layer_types", None) or ()):
        # Qwen2.5-Omni ships use_sliding_window=false; the engine's masks are full causal masks
        raise UnsupportedAttentionError("the language model has sliding-window attention layers, which the engine's "
                                        "masks do not implement; use a config with use_sliding_window: false")
    return name


def layer_mask(lm, allowed: torch.Tensor | None, hidden: torch.Tensor) -> torch.Tensor | None:
    """The `attention_mask` to hand every decoder layer of `lm` for queries `hidden` [B, q, H].

    `allowed`: boolean [B|1, 1, q, kv], True = may attend; or None = causal over these q tokens alone (a
    prompt pass whose cache holds nothing before it)."""
    import torch

    name = backend(lm)
    if allowed is None:
        if name == "sdpa":
            return None  # SDPA applies is_causal itself when q > 1 (and q = 1 attends to itself only)
        q = hidden.shape[1]
        allowed = torch.ones(q, q, dtype=torch.bool, device=hidden.device).tril()[None, None]
    if allowed.dtype != torch.bool:
        raise TypeError(f"layer_mask takes a boolean mask (True = attend), got {allowed.dtype}")
    if name == "sdpa":
        return allowed
    # eager: additive, as masking_utils.eager_mask builds it (0 where allowed, the dtype's minimum elsewhere)
    zero = torch.zeros((), dtype=hidden.dtype, device=hidden.device)
    return torch.where(allowed, zero, torch.finfo(hidden.dtype).min)
