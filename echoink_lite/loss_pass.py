"""The loss pass of one GRPO step: its micro-batches, which of them can be skipped, the rollout policy's
log-probs when the step's completions are reused, and one backward over the step per update.

A micro-batch holds up to `grpo.micro_batch_size` completions of ONE group, longest first (loss.py runs the
group's prompt once per micro-batch). Its loss is its share of the step's loss (`loss_variants.policy_loss`
with the step's normaliser), so the gradients summed over micro-batches (and processes) are the step's.

Skipping (`grpo.skip_zero_advantage_groups`): every loss type's per-token policy loss is a multiple of the
token's advantage, so a micro-batch whose advantages are all exactly 0 - every micro-batch of a group whose
completions all got the same reward - adds exactly 0 to the policy gradient. With beta = 0 that is its whole
loss, and skipping its passes (reference, old log-probs, policy forward and backward) leaves the summed
gradients bit for bit the same (tests/test_loss_variants.py). Two qualifications: with LoRA dropout the
micro-batches after a skipped one draw other dropout masks (the skipped pass draws none): the same
computation on other random numbers; with beta > 0 skipping drops those completions' KL term, which is why it
is then off unless asked for. The normalisers still count the skipped completions and tokens, as they must.

With num_iterations (mu) > 1 the rollout policy's log-probs are computed once, right after the rollout, by a
no-grad pass of the policy in eval mode (`rollout_logps`): the same code and kernels as the loss pass, so with
LoRA dropout 0 the first update's ratio is exactly 1. The rollout engine records log-probs too
(`RolloutResult.logps`), but it computes them one token at a time against its KV cache: other kernels, other
rounding; in bf16 its values differ from the loss pass's (measured in benchmarks/old_logps_bf16.py), and that
difference would show up as a ratio away from 1, and as clipping, before any update. The reference log-probs
(beta > 0) are computed in the same pass and kept for all mu updates (the reference never changes).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .loss import completion_logps
from .loss_variants import LossOut, LossSpec, policy_loss
from .thinker_forward import PromptInputs


@dataclass
class MicroBatch:
    group: int  # which of this process's prompts
    rows: list[int]  # indices into the step's completions
    ids: torch.Tensor  # [m, R] completion ids, right-padded
    real: torch.Tensor  # [m, R] 1 on real tokens, 0 on padding
    mask: torch.Tensor  # [m, R] loss mask: `real`, with 0 for completions that get no loss (masked truncated)
    advantages: torch.Tensor  # [m]
    pass_tokens: int  # tokens the decoder layers process for it: prompt + m x R
    zero_advantage: bool  # every advantage exactly 0
    skip: bool
    old: torch.Tensor | None = None  # rollout policy's log-probs (num_iterations > 1)
    ref: torch.Tensor | None = None  # reference log-probs kept for the updates (num_iterations > 1, beta > 0)


@dataclass
class PassStats:
    """Sums over one backward pass of this process's micro-batches (reduced over processes by the caller)."""

    loss: float = 0.0
    kl: float = 0.0
    kl_tokens: float = 0.0
    clip_low: float = 0.0
    clip_high: float = 0.0
    clip_units: float = 0.0  # tokens (token level) or completions (sequence level) the clip counts are over
    outputs: list[LossOut] = field(default_factory=list)  # per micro-batch that ran, only when asked (tests)


def plan_micro_batches(prompts: list[PromptInputs], completions: list[torch.Tensor], advantages: torch.Tensor,
                       loss_rows: torch.Tensor, group_size: int, micro_batch_size: int, pad_id: int, device,
                       skip_zero_advantage: bool) -> list[MicroBatch]:
    """The step's micro-batches on this process. `loss_rows` [n] bool: completions that get a loss (False for a
    truncated completion under mask_truncated_completions)."""
    out = []
    for gi, prompt in enumerate(prompts):
        members = sorted(range(gi * group_size, (gi + 1) * group_size), key=lambda i: -completions[i].numel())
        for s in range(0, len(members), micro_batch_size):
            idx = members[s: s + micro_batch_size]
            ids = _pad([completions[i] for i in idx], pad_id).to(device)
            real = _pad([torch.ones_like(completions[i]) for i in idx], 0).to(device)
            mask = real * loss_rows[idx].to(device, real.dtype).unsqueeze(1)
            adv = advantages[idx]
            zero = bool((adv == 0).all())
            out.append(MicroBatch(gi, idx, ids, real, mask, adv.to(device), prompt.length + ids.numel(), zero,
                                  skip=zero and skip_zero_advantage))
    return out


@torch.no_grad()
def rollout_logps(model, prompts: list[PromptInputs], micro_batches: list[MicroBatch], temperature: float,
                  chunk_tokens: int, beta: float) -> None:
    """Fill `old` (and `ref` when beta > 0) of every micro-batch that will run: the rollout policy's log-probs
    from a no-grad pass in eval mode (the mode the rollout sampled in), and the reference's."""
    was_training = model.training
    model.eval()
    try:
        for mb in micro_batches:
            if mb.skip:
                continue
            prompt = prompts[mb.group]
            mb.old = completion_logps(model, prompt, mb.ids, mb.real, temperature, chunk_tokens)
            if beta > 0:
                with model.disable_adapter():
                    mb.ref = completion_logps(model, prompt, mb.ids, mb.real, temperature, chunk_tokens)
    finally:
        model.train(was_training)


def backward_pass(model, prompts: list[PromptInputs], micro_batches: list[MicroBatch], spec: LossSpec,
                  normaliser: float, temperature: float, chunk_tokens: int, checkpoint_layers: bool,
                  keep_outputs: bool = False) -> PassStats:
    """Forward and backward of every micro-batch not skipped, gradients accumulated in the LoRA weights."""
    stats = PassStats()
    for mb in micro_batches:
        if mb.skip:
            continue
        prompt = prompts[mb.group]
        ref = mb.ref
        if spec.beta > 0 and ref is None:  # one update per rollout: the reference pass runs here, as it always did
            with torch.no_grad(), model.disable_adapter():
                ref = completion_logps(model, prompt, mb.ids, mb.real, temperature, chunk_tokens)
        logps = completion_logps(model, prompt, mb.ids, mb.real, temperature, chunk_tokens,
                                 checkpoint_layers=checkpoint_layers)
        out = policy_loss(logps, mb.old, ref, mb.advantages, mb.mask, spec, normaliser)
        out.loss.backward()
        stats.loss += float(out.loss.detach())
        stats.kl += float((out.kl.detach() * mb.mask).sum())
        stats.kl_tokens += float(mb.mask.sum())
        units = mb.mask if out.ratio.shape[-1] > 1 else (mb.mask.sum(-1, keepdim=True) > 0)
        stats.clip_low += float((out.clipped_low & units.bool()).sum())
        stats.clip_high += float((out.clipped_high & units.bool()).sum())
        stats.clip_units += float(units.sum())
        if keep_outputs:
            stats.outputs.append(out)
    return stats


def pass_sums(micro_batches: list[MicroBatch], group_count: int, passes: list[PassStats],
              masked: torch.Tensor) -> list[float]:
    """This process's numbers for `pass_metrics`, to be summed over processes."""
    zero_groups = skipped_groups = 0
    for gi in range(group_count):
        mine = [mb for mb in micro_batches if mb.group == gi]
        zero_groups += all(mb.zero_advantage for mb in mine)
        skipped_groups += all(mb.skip for mb in mine)
    per_pass = [sum(getattr(p, k) for p in passes) for k in ("kl", "kl_tokens", "clip_low", "clip_high", "clip_units")]
    return per_pass + [float(masked.sum()), float(zero_groups), float(skipped_groups),
                       float(sum(mb.pass_tokens for mb in micro_batches)),
                       float(sum(mb.pass_tokens for mb in micro_batches if mb.zero_advantage)),
                       float(sum(mb.pass_tokens for mb in micro_batches if mb.skip))]


def pass_metrics(summed: list[float], counters: dict, g) -> dict:
    """The loss pass's metrics from `pass_sums` summed over processes; adds the step's tokens to the run's
    `counters` (saved in checkpoints). Loss-pass tokens are what the decoder layers process: per micro-batch,
    the prompt plus the padded completions. "_run" shares are since the run started."""
    (kl, kl_tokens, clip_low, clip_high, clip_units, masked, zero_groups, skipped_groups, tokens, zero_tokens,
     skipped_tokens) = summed
    for key, value in (("loss_pass_tokens", tokens), ("zero_advantage_tokens", zero_tokens),
                       ("skipped_tokens", skipped_tokens)):
        counters[key] = counters.get(key, 0) + int(value)
    run_tokens = max(1, counters["loss_pass_tokens"])
    out = {
        "kl": kl / max(1.0, kl_tokens) if g.beta > 0 else None,
        "zero_advantage_groups": int(zero_groups),  # every advantage 0: no policy gradient
        "skipped_groups": int(skipped_groups),
        "skipped_tokens": int(skipped_tokens),
        "zero_advantage_token_share": zero_tokens / max(1.0, tokens),
        "skipped_token_share": skipped_tokens / max(1.0, tokens),
        "zero_advantage_token_share_run": counters["zero_advantage_tokens"] / run_tokens,
        "skipped_token_share_run": counters["skipped_tokens"] / run_tokens,
    }
    if g.mask_truncated_completions:
        out["masked_truncated_completions"] = int(masked)
    if g.num_iterations > 1 or g.loss_type == "cispo":  # with one update per rollout the ratio is 1: nothing clips
        units = max(1.0, clip_units)
        out.update({"clip_ratio/low": clip_low / units, "clip_ratio/high": clip_high / units,
                    "clip_ratio/region": (clip_low + clip_high) / units})
    return out


def _pad(seqs: list[torch.Tensor], value: int) -> torch.Tensor:
    width = max(1, max(int(c.numel()) for c in seqs))
    out = torch.full((len(seqs), width), value, dtype=torch.long)
    for i, c in enumerate(seqs):
        out[i, : c.numel()] = c
    return out
