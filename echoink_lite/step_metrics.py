"""The metrics of one GRPO step (a row of metrics.jsonl), summed over processes.

Kept out of grpo.py so `grpo_step` reads as the algorithm. Every process adds its own sums (rewards per
name, completions, tied groups, lengths, rollout tokens and time, the loss pass's counts) into one tensor,
which one all-reduce adds up; the means are taken after it, so they are the step's over all processes.
console.py prints these metrics; metrics.py writes them and draws the curves.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

import torch

from .loss_pass import pass_metrics, pass_sums

if TYPE_CHECKING:
    from .run_setup import Run


def step_metrics(run: Run, step: int, *, per_name: dict[str, list[float]], rewards: torch.Tensor, std: torch.Tensor,
                 comps: list, texts: list[str], roll, n_prompts: int, mbs: list, updates: list, masked: torch.Tensor,
                 t0: float, t_loss: float) -> dict[str, Any]:
    """The step's metrics: rewards (per name and total), tied groups, lengths, the update(s), times, rollout
    speed, the loss pass's KL, skipped groups and clipping, peak memory, and a sampled completion every
    logging.log_completions_every steps.
    `updates` holds (update metrics, loss pass) per update; `t0` is the step's start, `t_loss` the loss time."""
    recipe, dst, g = run.recipe, run.dst, run.recipe.grpo
    lengths = torch.tensor([c.numel() for c in comps], dtype=torch.float32)
    names = list(per_name)
    local = torch.tensor(
        [sum(per_name[n]) for n in names]
        + [float(rewards.sum()), float(len(comps)), float((std < 1e-8).sum()) if len(std) else 0.0, float(len(std)),
           float(lengths.sum()), float(roll.tokens if roll else 0), roll.seconds if roll else 0.0]
        + pass_sums(mbs, n_prompts, [p for _, p in updates], masked),
        dtype=torch.float64,
    )
    tot = dst.sum_(local).tolist()
    k = len(names)
    n = max(1.0, tot[k + 1])
    metrics: dict[str, Any] = {f"reward/{nm}": tot[i] / n for i, nm in enumerate(names)}
    metrics.update(
        reward=tot[k] / n,
        accuracy=metrics.get("reward/accuracy"),
        format_rate=metrics.get("reward/format"),
        zero_std_fraction=tot[k + 2] / max(1.0, tot[k + 3]),  # groups whose completions all got the same reward
        completion_length=tot[k + 4] / n,
        **_update_metrics(updates),
        rollout_tokens_per_s=tot[k + 5] / max(1e-9, tot[k + 6] / dst.world),  # tokens over mean rollout time
        step_time_s=time.time() - t0,
        rollout_time_s=roll.seconds if roll else 0.0,
        train_time_s=t_loss,
        rollout_path=roll.path if roll else None,
        skipped_rows=run.counters["skipped_rows"],
        **pass_metrics(tot[k + 7:], run.counters, g),  # kl, the skipped groups and tokens, clipping
    )
    metrics.update(_peak_memory(dst.device))
    if recipe.logging.log_completions_every and (step + 1) % recipe.logging.log_completions_every == 0 and texts:
        metrics["sample_completion"] = texts[0][:500]
    return metrics


def _update_metrics(updates: list) -> dict[str, Any]:
    """loss, grad_norm, lr and skipped_step of the step; with several updates per rollout, the mean loss and
    gradient norm, the first update's learning rate, and each update's own values under `updates`."""
    first = updates[0][0]
    if len(updates) == 1:
        return first
    losses, norms = [u["loss"] for u, _ in updates], [u["grad_norm"] for u, _ in updates]
    return {"loss": sum(losses) / len(losses), "grad_norm": sum(norms) / len(norms), "lr": first["lr"],
            "skipped_step": any(u["skipped_step"] for u, _ in updates),
            "updates": [{"loss": u["loss"], "grad_norm": u["grad_norm"], "lr": u["lr"]} for u, _ in updates]}


def _peak_memory(device) -> dict[str, float]:
    if device.type == "cuda":
        return {"peak_gpu_allocated_gb": torch.cuda.max_memory_allocated(device) / 2**30,
                "peak_gpu_reserved_gb": torch.cuda.max_memory_reserved(device) / 2**30}
    import resource

    return {"peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}
