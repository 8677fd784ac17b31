"""The GRPO loss pass: completion log-probs with the prompt run once per group, and the loss.

Every completion of a group shares its prompt (~700 tokens of text, audio and image). Running the prompt
again for each of the 16 completions, as a plain `thinker(prompt + completion)` batch does, spends most of
the forward on identical work. Here (prefix sharing, as in "Prefix Grouper", arXiv 2506.05433):

1. the prompt runs once through the decoder layers (from the embeddings `encode_prompts` made, so the
   towers do not run again), keeping each layer's keys and values;
2. the group's completions run as a batch whose attention sees those prompt keys/values (`SharedPrefixKV`)
   and, causally, their own tokens;
3. log-probs are taken for completion tokens only, in chunks (`token_logps`).

This is exact, not an approximation: the prompt's keys and values are the same tensors for every
completion, and gradients flow back through them into the prompt pass. tests/test_engine.py checks log-probs
(within 1e-5 in fp32) and LoRA gradients against the full `thinker.model(...)` forward. Tokens per group go
from G x (P + R) to P + G x R. With `checkpoint_layers`, each decoder layer keeps only its input and is
recomputed in backward (the kit's gradient checkpointing; transformers' own would drop the shared prefix).

The loss formulas (the paper's and TRL's variants) and the advantages are in loss_variants.py; `grpo_loss` and
`group_advantages` here are the names the rest of the kit and its tests have always used.
"""

from __future__ import annotations

import torch

from .grpo_options import canonical_loss_type
from .loss_variants import LossSpec, group_advantages, policy_loss  # noqa: F401 (group_advantages: its old home)
from .thinker_forward import CaptureKV, PromptInputs, language_model, rope, run_layers, text_positions, thinker_of, token_logps


class SharedPrefixKV:
    """A read-only prefix (one prompt's per-layer keys/values) in front of a batch's own keys/values.
    Stateless, so a checkpoint recompute gives the same tensors."""

    def __init__(self, prefix: CaptureKV, batch: int):
        self.prefix, self.batch = prefix, batch

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        k, v = self.prefix.keys[layer_idx], self.prefix.values[layer_idx]
        k = torch.cat([k.expand(self.batch, -1, -1, -1), key_states], dim=2)
        v = torch.cat([v.expand(self.batch, -1, -1, -1), value_states], dim=2)
        return k, v


def prefix_mask(prompt_len: int, completion_len: int, device) -> torch.Tensor:
    """[1, 1, R, P + R] boolean: every completion token sees the whole prompt and its own earlier tokens."""
    causal = torch.ones(completion_len, completion_len, dtype=torch.bool, device=device).tril()
    prompt = torch.ones(completion_len, prompt_len, dtype=torch.bool, device=device)
    return torch.cat([prompt, causal], dim=1)[None, None]


def completion_logps(model, prompt: PromptInputs, completion_ids: torch.Tensor, mask: torch.Tensor, temperature: float,
                     chunk_tokens: int, checkpoint_layers: bool = False) -> torch.Tensor:
    """[m, R] log-probs of `completion_ids` [m, R] (right-padded; `mask` [m, R] marks real tokens, padding
    gets 0) given one shared prompt. Differentiable with respect to the LoRA weights when grad is enabled."""
    thinker, lm = thinker_of(model), language_model(model)
    m, width = completion_ids.shape
    device = completion_ids.device
    # 1. the prompt, once
    prefix = CaptureKV()
    p_embeds = prompt.embeds[None]
    p_hidden = run_layers(lm, p_embeds, rope(lm, p_embeds, prompt.positions[:, None, :]), None, prefix, checkpoint_layers)
    # 2. the completions, attending to the prompt's keys/values
    c_embeds = lm.embed_tokens(completion_ids)
    start = torch.full((m,), prompt.next_position, dtype=torch.long, device=device)
    pe = rope(lm, c_embeds, text_positions(start, width))
    c_hidden = run_layers(lm, c_embeds, pe, prefix_mask(prompt.length, width, device), SharedPrefixKV(prefix, m),
                          checkpoint_layers)
    # 3. position t predicts token t+1: the prompt's last position predicts completion token 0
    predictors = torch.cat([p_hidden[:, -1:].expand(m, 1, -1), c_hidden[:, :-1]], dim=1)  # [m, R, H]
    keep = mask.bool()
    out = torch.zeros(m, width, dtype=torch.float32, device=device)
    out[keep] = token_logps(thinker.lm_head, predictors[keep], completion_ids[keep], temperature, chunk_tokens)
    return out


def grpo_loss(logps: torch.Tensor, ref_logps: torch.Tensor | None, advantages: torch.Tensor, mask: torch.Tensor,
              beta: float, loss_type: str, normaliser: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss to backward, per-token KL) for one micro-batch with one update per rollout; `normaliser` is the
    step's divisor for `loss_type` (`loss_variants.step_normaliser`: completions for 'grpo', the paper's, alias
    'sequence'; tokens for 'dapo', alias 'token'). `loss_variants.policy_loss` is the general form."""
    out = policy_loss(logps, None, ref_logps, advantages, mask, LossSpec(canonical_loss_type(loss_type), beta=beta),
                      normaliser)
    return out.loss, out.kl
