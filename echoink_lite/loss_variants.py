"""GRPO's loss variants and advantages, formula by formula as TRL 1.16 computes them.

Every formula cites the function of trl/trainer/grpo_trainer.py (TRL 1.16, installed with the kit) it follows;
tests/test_loss_variants.py calls that function itself (`GRPOTrainer._compute_loss` with a stub trainer) on
the same tensors and compares losses and gradients.

Per token (`GRPOTrainer._compute_loss`), with r = exp(log-ratio to the rollout policy) and A the advantage:
  - importance_sampling_level: token -> one r per token; sequence (GSPO) -> one r per completion, from the
    mean of its tokens' log-ratios;
  - grpo, bnpo, dr_grpo, dapo: -min(r A, clip(r, 1 - epsilon, 1 + epsilon_high) A);
  - cispo: -min(r, epsilon_high).detach() A logp;
  - sapo: -(4 / tau) sigmoid(tau (r - 1)) A, tau = sapo_temperature_pos where A > 0, else _neg;
  - plus beta x k3-KL to the reference, exp(x) - x - 1 with x = ref_logp - logp. One difference from TRL,
    kept from the paper (EchoInk-R1's trainer, from R1-V): x is clamped to [-10, 10] (TRL does not clamp),
    for every loss type, so the paper's loss stays the same to the bit.
Aggregation over one step, all processes and micro-batches together (the same `_compute_loss` branches, with
its division by gradient-accumulation steps and DDP's mean over processes multiplied out):
  - grpo, sapo: token mean per completion, summed, / completions in the step (the paper's loss);
  - bnpo: token mean of each micro-batch, / micro-batches in the step. TRL normalises by the active tokens
    of the "local batch" (one per_device_train_batch_size batch), which in the kit is one micro-batch
    (`grpo.micro_batch_size`), so for bnpo that knob changes the math;
  - dr_grpo: token sum / (max_completion_length x completions in the step);
  - dapo, cispo: token sum / active tokens in the step (`num_items_in_batch`, gathered over processes).
`step_normaliser` gives that divisor (the step's, not the micro-batch's); each micro-batch's loss is its own
sum divided by it, so the gradients summed over micro-batches and processes are the step's gradient.

With one update per rollout (num_iterations = 1) the rollout policy is the current one: its log-probs are
`logp.detach()` (as TRL's `old_per_token_logps is None` branch), r = 1 in value and its gradient is the
policy gradient; clipping cannot act, so the clipped branch is only built when old log-probs are given.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

KL_LOG_RATIO_CLAMP = 10.0  # the paper's clamp of ref_logp - logp (R1-V's grpo_trainer.py, `x_clamped`)


@dataclass(frozen=True)
class LossSpec:
    """What the loss needs from a recipe's `grpo` section (loss_type in TRL's names)."""

    loss_type: str = "grpo"
    importance_sampling_level: str = "token"
    beta: float = 0.0
    epsilon_low: float = 0.2
    epsilon_high: float = 0.2
    sapo_temperature_pos: float = 1.0
    sapo_temperature_neg: float = 1.05
    max_completion_length: int = 768

    @classmethod
    def from_recipe(cls, recipe) -> "LossSpec":
        from .grpo_options import upper_clip

        g = recipe.grpo
        return cls(g.loss_type, g.importance_sampling_level, g.beta, g.epsilon, upper_clip(g), g.sapo_temperature_pos,
                   g.sapo_temperature_neg, recipe.generation.max_completion_tokens)


@dataclass
class LossOut:
    loss: torch.Tensor  # this micro-batch's share of the step's loss (backward it)
    kl: torch.Tensor  # [m, R] per-token k3 KL (zeros when beta is 0)
    ratio: torch.Tensor  # [m, R] or [m, 1] (sequence level): the importance ratio r, detached
    clipped_low: torch.Tensor  # same shape, bool: r < 1 - epsilon where A < 0 (the clipped branch is flat there)
    clipped_high: torch.Tensor  # r > 1 + epsilon_high where A > 0 (cispo: r > epsilon_high where A > 0)


def step_normaliser(spec: LossSpec, completions: float, tokens: float, micro_batches: float) -> float:
    """The divisor each loss type names, from the step's totals over all processes: completions, active
    (unmasked) completion tokens, and loss-pass micro-batches (skipped ones included: they add 0)."""
    t = spec.loss_type
    if t in ("grpo", "sapo"):
        return max(1.0, completions)
    if t == "bnpo":
        return max(1.0, micro_batches)
    if t == "dr_grpo":
        return max(1.0, completions * spec.max_completion_length)
    if t in ("dapo", "cispo"):
        return max(1.0, tokens)
    raise ValueError(f"unknown loss_type {t!r}")


def policy_loss(logps: torch.Tensor, old_logps: torch.Tensor | None, ref_logps: torch.Tensor | None,
                advantages: torch.Tensor, mask: torch.Tensor, spec: LossSpec, normaliser: float) -> LossOut:
    """One micro-batch: `logps` [m, R] (with grad), `old_logps` the rollout policy's (None with one update per
    rollout), `ref_logps` the reference's (beta > 0), `advantages` [m], `mask` [m, R] (0 = padding or masked)."""
    maskf = mask.to(logps.dtype)
    adv = advantages.unsqueeze(1) if advantages.dim() == 1 else advantages
    old = logps.detach() if old_logps is None else old_logps
    # GRPOTrainer._compute_loss: log_importance_weights at the token or the sequence level
    log_ratio = logps - old
    if spec.importance_sampling_level == "sequence":
        log_w = ((log_ratio * maskf).sum(-1) / maskf.sum(-1).clamp(min=1.0)).unsqueeze(-1)
    elif spec.importance_sampling_level == "token":
        log_w = log_ratio
    else:
        raise ValueError(f"unknown importance_sampling_level {spec.importance_sampling_level!r}")
    coef_1 = torch.exp(log_w)

    kl = torch.zeros_like(logps)
    if spec.beta != 0 and ref_logps is not None:
        x = (ref_logps - logps).clamp(-KL_LOG_RATIO_CLAMP, KL_LOG_RATIO_CLAMP)
        kl = torch.exp(x) - x - 1

    low = high = torch.zeros_like(coef_1, dtype=torch.bool)
    t = spec.loss_type
    if t in ("grpo", "bnpo", "dr_grpo", "dapo"):
        if old_logps is None:
            per_token = -coef_1 * adv  # r = 1: the clipped branch equals it, TRL's min picks the same value
        else:
            coef_2 = torch.clamp(coef_1, 1 - spec.epsilon_low, 1 + spec.epsilon_high)
            per_token = -torch.min(coef_1 * adv, coef_2 * adv)
            low = (coef_1 < 1 - spec.epsilon_low) & (adv < 0)
            high = (coef_1 > 1 + spec.epsilon_high) & (adv > 0)
    elif t == "cispo":
        clamped = torch.clamp(coef_1, max=spec.epsilon_high).detach()
        per_token = -clamped * adv * logps
        high = (coef_1 > spec.epsilon_high) & (adv > 0)
    elif t == "sapo":
        tau = torch.where(adv > 0, spec.sapo_temperature_pos, spec.sapo_temperature_neg)
        per_token = -(torch.sigmoid(tau * (coef_1 - 1)) * 4 / tau) * adv
    else:
        raise ValueError(f"unknown loss_type {t!r}")
    if spec.beta != 0 and ref_logps is not None:
        per_token = per_token + spec.beta * kl

    # GRPOTrainer._compute_loss: the aggregation branches, one step's normaliser (see the module docstring)
    if t in ("grpo", "sapo"):
        per_seq = (per_token * maskf).sum(-1) / maskf.sum(-1).clamp(min=1)
        loss = per_seq.sum() / normaliser
    elif t == "bnpo":
        loss = (per_token * maskf).sum() / maskf.sum().clamp(min=1.0) / normaliser
    else:  # dr_grpo, dapo, cispo: a token sum over a step constant
        loss = (per_token * maskf).sum() / normaliser
    return LossOut(loss, kl, coef_1.detach(), low, high)


def group_advantages(rewards: torch.Tensor, group_size: int, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(advantages, per-group std) for rewards laid out group by group: (r - mean) / (std + eps), the paper's."""
    g = rewards.view(-1, group_size)
    std = g.std(dim=1)  # unbiased, as the original
    adv = (g - g.mean(dim=1, keepdim=True)) / (std.unsqueeze(1) + eps)
    return adv.view(-1), std


def advantages(rewards: torch.Tensor, group_size: int, scale: str, eps: float,
               all_rewards: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(advantages, per-group std) as `GRPOTrainer._generate_and_score_completions` (sum_then_normalize):
    r - group mean, divided by (group std + eps) for 'group', by (the std of the whole step's rewards over
    all processes, `all_rewards`) + eps for 'batch', not divided for 'none' (Dr. GRPO)."""
    if scale == "group":
        return group_advantages(rewards, group_size, eps)
    g = rewards.view(-1, group_size)
    std = g.std(dim=1)
    centred = (g - g.mean(dim=1, keepdim=True)).view(-1)
    if scale == "none":
        return centred, std
    if scale == "batch":
        pool = rewards if all_rewards is None else all_rewards
        return centred / (pool.std() + eps), std
    raise ValueError(f"unknown scale_rewards {scale!r}")


def truncated(completions: list[torch.Tensor], eos_id: int) -> torch.Tensor:
    """[n] bool: completions that stopped at the length cap without EOS (the rollout keeps EOS as the last
    token), as TRL's `mask_truncated_completions` finds them (last id not EOS or padding)."""
    return torch.tensor([bool(c.numel()) and int(c[-1]) != eos_id for c in completions], dtype=torch.bool)
