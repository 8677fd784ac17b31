"""What `train` prints: the plan table before step 1, one line per step (80 columns) and warnings.

Kept out of grpo.py so the training loop reads as the algorithm. Every number printed here is also in
RUN/metrics.jsonl (plus the ones that do not fit a line: gradient norm, learning rate, memory, tied groups).
"""

from __future__ import annotations

from typing import Any

from .grpo_options import describe


def make_console(console=None):
    if console is not None:
        return console
    from rich.console import Console

    return Console()


def print_plan(console, recipe, derived: dict, run_dir, start_step: int, n_bad: int, total: int, engine: str) -> None:
    from rich.table import Table

    t = Table(title="echoink-lite GRPO plan", show_header=False)
    g, gen = recipe.grpo, recipe.generation
    quant = f"4-bit NF4, LoRA r={recipe.lora.r}" if recipe.quantization.load_in_4bit else f"{recipe.model.dtype}, LoRA r={recipe.lora.r}"
    rows = [
        ("model", f"{recipe.model.name_or_path}  ({quant})"),
        ("training rows", f"{derived['train_rows']} usable ({n_bad} rejected of {total})"),
        ("steps", f"{derived['total_steps']} (starting at {start_step}; {derived['steps_per_epoch']} per epoch)"
                  + (f"; {g.num_iterations} updates each" if g.num_iterations > 1 else "")),
        ("prompts per step", str(g.prompts_per_step)),
        ("group size", str(g.group_size)),
        ("completions per step", f"{derived['completions_per_step']} ({derived['completions_per_process']} per process x {derived['world_size']})"),
        ("rollout", f"{derived['decode_batches_per_step']} decode batch(es) of up to {min(g.rollout_batch_size, derived['completions_per_process'])} rows; {engine}"),
        ("loss pass", f"prompt once per group, {derived['micro_batches_per_step']} micro-batches of up to {min(g.micro_batch_size, g.group_size)} completions"),
        ("completion tokens", f"up to {gen.max_completion_tokens} per completion, {derived['rollout_tokens_budget']} per step"),
        ("loss", describe(recipe)),
        ("learning rate", f"{recipe.schedule.learning_rate} {recipe.schedule.lr_scheduler}"),
        ("outputs", str(run_dir)),
    ]
    for k, v in rows:
        t.add_row(k, v)
    console.print(t)
    reward_max = sum(recipe.grpo.rewards.values())
    console.print(f"step lines: reward (max {reward_max:g}), acc = sampled training accuracy, len = mean completion "
                  "tokens, kl to the base model, rollout tokens/s, step seconds, time left (a NON-FINITE step is skipped). "
                  "All metrics: "
                  f"{run_dir}/metrics.jsonl", highlight=False)


def _fmt(v, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def _duration(seconds: float) -> str:
    seconds = int(max(0, seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else (f"{m}m{s:02d}s" if m else f"{s}s")


def _sci(v) -> str:
    """1.2e-3 rather than 1.2e-03: the step line has no column to spare."""
    return "-" if v is None else format(v, ".1e").replace("e-0", "e-").replace("e+0", "e+")


def step_line(m: dict[str, Any], total: int, eta_s: float | None) -> str:
    """One step in at most 80 columns, e.g.
    `[ 12/562] reward 1.23 acc 0.50 len 215 kl 1.2e-3 3100 tok/s 71s eta 10h52m`."""
    width = len(str(total))
    line = (f"[{m['step']:>{width}}/{total}] reward {_fmt(m['reward'], '.2f')} acc {_fmt(m['accuracy'], '.2f')} "
            f"len {_fmt(m['completion_length'], '.0f')} kl {_sci(m['kl'])} "
            f"{m['rollout_tokens_per_s']:.0f} tok/s {m['step_time_s']:.0f}s")
    if m.get("skipped_step"):
        return line + " NON-FINITE"  # the step was skipped (the plan's legend says so)
    if eta_s is not None:
        line += f" eta {_duration(eta_s)}"
    return line


def print_step(console, m: dict, total: int, eta_s: float | None) -> None:
    console.print(step_line(m, total, eta_s), highlight=False, markup=False)
    if m.get("sample_completion"):
        console.print(f"  sample: {m['sample_completion']!r}", highlight=False, markup=False)


def warn_on_metrics(console, m: dict, counters: dict) -> None:
    """Warnings that a run is not learning, printed at the 3rd/10th/30th (5th/20th) step in a row."""
    if m["zero_std_fraction"] >= 0.75:
        counters["warned_no_signal"] += 1
        if counters["warned_no_signal"] in (3, 10, 30):
            console.print(f"[yellow]warning: in {m['zero_std_fraction']:.0%} of groups every completion got the same reward "
                          "for several steps (no learning signal). Raise grpo.group_size or generation.temperature, "
                          "or use harder/easier data.[/]")
    else:
        counters["warned_no_signal"] = 0
    if (m["reward"] or 0.0) == 0.0:
        counters["zero_reward_steps"] += 1
        if counters["zero_reward_steps"] in (5, 20):
            console.print("[yellow]warning: every reward has been zero for several steps: check the prompt format, "
                          "the solutions (`echoink-lite data check`), and generation.max_completion_tokens.[/]")
    else:
        counters["zero_reward_steps"] = 0
