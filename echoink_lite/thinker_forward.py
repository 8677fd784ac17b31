"""The thinker's forward pass, in the pieces that the rollout engine and the loss pass share.

`thinker(**batch)` runs everything on every call: the audio tower, the vision tower, the language model over
the whole sequence and `lm_head` over every position. A GRPO step needs less, so the kit calls the same
modules (and therefore the same LoRA layers) piece by piece:

- `encode_prompts`: the frozen audio and vision towers run ONCE per prompt per step (one batched call each). The prompt's input
  embeddings and its 3-D rope positions (`PromptInputs`) are kept and reused by the rollout, the reference
  pass and the policy pass. Before, the towers ran again for every completion in every pass.
- `run_layers`: the decoder layers with a cache object the caller chooses: a static cache for decoding
  (rollout.py), a capture cache for a prompt pass, a shared-prefix cache for the loss (loss.py). Gradient
  checkpointing is done here, per layer, so it works with a cache (transformers' own checkpointing drops
  `past_key_values`, see `GradientCheckpointingLayer` in transformers/modeling_layers.py).
- `token_logps`: log-probs of chosen tokens only, in chunks of positions; `lm_head` never runs over a prompt.

tests/test_engine.py proves these pieces give the same log-probs and LoRA gradients as `thinker.model(...)`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.utils.checkpoint import checkpoint

from .attention import layer_mask
from .prompting import Encoded, stack_audio


def thinker_of(model):
    """The `Qwen2_5OmniThinkerForConditionalGeneration` inside a PEFT model (or the model itself)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def language_model(model):
    return thinker_of(model).model.language_model


def disable_hf_checkpointing(model) -> None:
    """Turn transformers' per-layer checkpointing off on the language model: it would drop our caches.
    The loss pass checkpoints each layer itself (`run_layers(..., checkpoint_layers=True)`)."""
    for layer in language_model(model).layers:
        layer.gradient_checkpointing = False


@dataclass
class PromptInputs:
    """One prompt after the towers: what every pass of a step reuses."""

    embeds: torch.Tensor  # [L, hidden] input embeddings with audio and image features scattered in
    positions: torch.Tensor  # [3, L] multimodal rope positions (temporal, height, width)
    next_position: int  # rope position of the first completion token (text positions continue from here)
    input_ids: torch.Tensor | None = None  # [L] the prompt's token ids (for a repetition penalty)

    @property
    def length(self) -> int:
        return int(self.embeds.shape[0])


@torch.no_grad()
def encode_prompts(model, encoded: list[Encoded], device, float_dtype) -> list[PromptInputs]:
    """Run the frozen towers once for all prompts (one audio-tower and one vision-tower call) and build each
    prompt's input embeddings as `thinker.model(...)` builds them inside."""
    if not encoded:
        return []
    inner = thinker_of(model).model  # Qwen2_5OmniThinkerModel: towers + language model
    features, fmask = stack_audio(encoded)
    fmask, features = fmask.to(device), features.to(device, float_dtype)
    audio = inner.get_audio_features(features, fmask, return_dict=True).last_hidden_state
    grids = torch.cat([e.image_grid_thw for e in encoded]).to(device)
    pixels = torch.cat([e.pixel_values for e in encoded]).to(device, float_dtype)
    images = inner.get_image_features(pixels, grids, return_dict=True).pooler_output  # one tensor per image
    audio_id = inner.config.audio_token_id
    out, start = [], 0
    for e, fm, grid, image in zip(encoded, fmask, grids, images):
        ids = e.input_ids[None].to(device)
        embeds = inner.get_input_embeddings()(ids)
        n_audio = int((ids == audio_id).sum())
        clip, start = audio[start: start + n_audio], start + n_audio
        _, _, audio_mask = inner.get_placeholder_mask(ids, inputs_embeds=embeds)
        embeds = embeds.masked_scatter(audio_mask, clip.to(embeds.device, embeds.dtype))
        image = image.to(embeds.device, embeds.dtype)
        image_mask, _, _ = inner.get_placeholder_mask(ids, inputs_embeds=embeds, image_features=image)
        embeds = embeds.masked_scatter(image_mask, image)
        positions, _ = inner.get_rope_index(ids, grid[None], None, torch.ones_like(ids), False, fm.sum()[None], None)
        positions = positions[:, 0]  # [3, L]
        out.append(PromptInputs(embeds[0], positions, int(positions.max()) + 1, e.input_ids))
    if start != audio.shape[0]:
        raise ValueError(f"audio features for {audio.shape[0]} tokens but {start} audio placeholders in the prompts")
    return out


def rope(lm, hidden: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(cos, sin) for `positions` [3, B, L], as the language model computes them once per forward."""
    return lm.rotary_emb(hidden, positions)


def text_positions(start: torch.Tensor, length: int) -> torch.Tensor:
    """[3, B, length] rope positions of generated text: `start` [B] onwards, the same on all three axes."""
    pos = start.view(-1, 1) + torch.arange(length, device=start.device).view(1, -1)
    return pos.unsqueeze(0).expand(3, -1, -1)


def run_layers(lm, hidden: torch.Tensor, position_embeddings, attention_mask, cache, checkpoint_layers: bool = False) -> torch.Tensor:
    """The decoder layers and the final norm. `attention_mask`: None (causal over these tokens alone) or a
    boolean [B|1, 1, q, kv] (True = attend); attention.layer_mask puts it in the form the model's attention
    backend reads. `cache`: any object with `update(key, value, layer_idx)`, or None."""
    attention_mask = layer_mask(lm, attention_mask, hidden)
    for layer in lm.layers:
        if checkpoint_layers and torch.is_grad_enabled():
            hidden = checkpoint(layer, hidden, attention_mask=attention_mask, position_embeddings=position_embeddings,
                                past_key_values=cache, use_reentrant=False)
        else:
            hidden = layer(hidden, attention_mask=attention_mask, position_embeddings=position_embeddings,
                           past_key_values=cache)
    return lm.norm(hidden)


class CaptureKV:
    """A cache for a prompt pass: keeps each layer's keys and values (rope applied), attends to nothing else.
    Writing again (a checkpoint recompute) overwrites, so it is safe under gradient checkpointing."""

    def __init__(self):
        self.keys: dict[int, torch.Tensor] = {}
        self.values: dict[int, torch.Tensor] = {}

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        self.keys[layer_idx], self.values[layer_idx] = key_states, value_states
        return key_states, value_states


def _chunk_logps(lm_head, hidden: torch.Tensor, targets: torch.Tensor, temperature: float) -> torch.Tensor:
    logits = lm_head(hidden).float()
    if temperature != 1.0:
        logits = logits / temperature
    # log p(target) = logit(target) - logsumexp(logits): no [N, vocab] log-softmax tensor is kept
    return logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, dim=-1)


def token_logps(lm_head, hidden: torch.Tensor, targets: torch.Tensor, temperature: float, chunk_tokens: int) -> torch.Tensor:
    """[N] log-probs of `targets` [N] given `hidden` [N, H] (the positions that predict them), `chunk_tokens`
    rows at a time. With gradients, each chunk's logits are recomputed in backward instead of kept."""
    parts = []
    step = max(1, int(chunk_tokens))
    for s in range(0, hidden.shape[0], step):
        h, t = hidden[s: s + step], targets[s: s + step]
        if torch.is_grad_enabled():
            parts.append(checkpoint(_chunk_logps, lm_head, h, t, temperature, use_reentrant=False))
        else:
            parts.append(_chunk_logps(lm_head, h, t, temperature))
    return torch.cat(parts) if parts else hidden.new_zeros(0, dtype=torch.float32)
