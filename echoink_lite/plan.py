"""`echoink-lite plan`: print a recipe's peak GPU memory estimate, whether it fits, and what to turn if not.

The planner is four modules:
- thinker_sizes.py: the model's sizes without the network (its config, `Dims`, parameter counts);
- memory_estimate.py: the estimate itself (the formula, `estimate_memory`);
- memory_suggestions.py: the knobs tried when a recipe does not fit, and the search over them;
- plan.py (this one): the `plan` command's output, and the check `train` runs before loading the model.
The names scripts and notebooks use are importable from here too (`from echoink_lite.plan import
estimate_memory`). Argument parsing lives in cli.py.

Units: the output is in GiB (2**30 bytes) throughout, and says so once. GPU sizes written "24GB" are read
as GiB, which is what a "24 GB" card holds.

The table prints each phase term by term. A phase is not a plain sum: terms that are never in memory at
the same time (the prefill and the decode step; the reference forward and the policy pass) count only by
the largest of them. The table lists them under "largest of", prints the ones that do not count in
(brackets), and closes each phase with its total, which is the sum of the rows not in brackets.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import memory_estimate as _estimate
from .memory_estimate import (
    ALLOCATOR_RESERVE_FRACTION, COMPONENT_LABELS, DEFAULT_GPU_GIB, DEFAULT_HEADROOM, DEFAULT_TEXT_TOKENS, GIB,
    MemoryEstimate, Terms, detected_gpu_memory_gib, find_group, largest_member, nf4_bits_per_param,
    prompt_token_estimate, term_size,
)
from .memory_suggestions import Suggestion, suggest_changes
from .recipe import Recipe, RecipeError, load_recipe
from .recipe_bounds import CONTEXT_TOKENS
from .thinker_sizes import (
    Dims, PlanError, bundled_thinker_config, count_parameters, load_thinker_config, lora_parameter_count,
)

# AVQA-R1-6K's train split (harryhsing/AVQA-R1-6K, omni_rl_format_train.json) has 4,490 items; the EchoInk-R1
# paper (arXiv 2505.04623) trains one epoch of them, 8 prompts per step: 562 steps.
PAPER_TRAIN_ROWS = 4490

UNITS_LINE = 'Sizes in GiB (2**30 bytes); a "24GB" GPU or --gpu-memory 24GB means 24 GiB.'
BRACKETS_LINE = ("(brackets): an alternative never in memory with the largest one, so not counted.\n"
                 "'=' rows: the sum of the rows above them that are not in brackets.")

# Groups printed as rows of the group around them, without a heading of their own.
INLINE_GROUPS = ("overhead",)
# Headings of the formula's groups (memory_estimate.estimate_memory names them).
GROUP_HEADINGS = {
    "rollout_step": "largest of (one at a time):",
    "reference_or_policy": "largest of (one after the other):",
    "backward_step": "largest of (one at a time):",
    "phase": "largest of the two phases (one after the other):",
    "policy": "policy forward + backward",
}


@dataclass(frozen=True)
class Row:
    """One line of the estimate table: a term (gib set) or a heading (gib None). `counted` is False for an
    alternative that loses its "largest of" (printed in brackets)."""

    depth: int
    text: str
    gib: float | None
    counted: bool = True


# ---------------------------------------------------------------------------------------------------
# The table
# ---------------------------------------------------------------------------------------------------

def estimate_memory(recipe, gpu_memory_gb: float | None = None, *, suggest: bool = True, **kw) -> MemoryEstimate:
    """`memory_estimate.estimate_memory`, plus (with `suggest`, when the recipe does not fit) the changes
    that make it fit (`memory_suggestions.suggest_changes`)."""
    est = _estimate.estimate_memory(recipe, gpu_memory_gb, **kw)
    if suggest and not est.fits:
        est.suggestions = suggest_changes(recipe, est, config=kw.get("config"), prompt_tokens=kw.get("prompt_tokens"),
                                          text_tokens=kw.get("text_tokens", DEFAULT_TEXT_TOKENS))
    return est

def component_label(key: str, est: MemoryEstimate, recipe: Recipe) -> str:
    """What a component is, with the numbers that size it where they help."""
    tk, comp = est.tokens, est.components
    if key == "llm_linears":
        q = recipe.quantization
        how = (f"4-bit {q.quant_type}, {nf4_bits_per_param(q.double_quant):.3f} bit/param" if q.load_in_4bit
               else recipe.model.dtype)
        return f"{COMPONENT_LABELS[key]} ({how})"
    if key == "lora_state":
        return f"LoRA + grads + AdamW: {est.params['lora']:,} params (r={recipe.lora.r}) x 16 B fp32"
    if key == "rollout_kv_cache" and tk.get("rollout_batch"):
        kib = comp[key] * GIB / (tk["rollout_batch"] * tk["sequence"]) / 1024
        return f"static KV cache: {tk['rollout_batch']} rows x {tk['sequence']:,} tokens x {kib:.0f} KiB"
    if key == "allocator_reserve":
        return f"allocator reserve beyond its peak ({100 * ALLOCATOR_RESERVE_FRACTION:.0f}% of weights + LoRA + phase)"
    return COMPONENT_LABELS.get(key, key)


def group_title(name: str, est: MemoryEstimate) -> str:
    tk = est.tokens
    return {
        "weights": "weights",
        "rollout": f"rollout phase: decode batch of {tk['rollout_batch']} rows",
        "training": f"training phase: micro-batch of {tk['micro_batch']} completions + their prompt",
        "peak": "peak = weights + LoRA + the larger phase + overhead",
    }.get(name, GROUP_HEADINGS.get(name, name))


def formula_rows(term: str | Terms, est: MemoryEstimate, recipe: Recipe, *, depth: int = 0, counted: bool = True,
                 collapse: tuple[str, ...] = ()) -> list[Row]:
    """The rows of one term of the formula. Groups named in `collapse` are one row with their total."""
    comp = est.components
    if isinstance(term, str):
        return [Row(depth, component_label(term, est, recipe), comp[term], counted)]
    if term.name in collapse:
        return [Row(depth, group_title(term.name, est), term_size(term, comp), counted)]
    if term.name in INLINE_GROUPS:  # its members read better as rows of the enclosing group
        return [row for member in term.terms
                for row in formula_rows(member, est, recipe, depth=depth, counted=counted, collapse=collapse)]
    if term.combine == "largest":
        winner = term.terms.index(largest_member(term, comp))
        rows = [Row(depth, GROUP_HEADINGS.get(term.name, "largest of:"), None, counted)]
        for i, member in enumerate(term.terms):
            rows += formula_rows(member, est, recipe, depth=depth + 1, counted=counted and i == winner, collapse=collapse)
        return rows
    heading = f"{GROUP_HEADINGS.get(term.name, term.name)}, {term_size(term, comp):.2f} in all:"
    rows = [Row(depth, heading, None, counted)]
    for member in term.terms:
        rows += formula_rows(member, est, recipe, depth=depth + 1, counted=counted, collapse=collapse)
    return rows


def section_rows(name: str, est: MemoryEstimate, recipe: Recipe) -> list[Row]:
    """The rows of one section of the table: a phase term by term, or the peak from the phases' totals.
    Every section ends with its total, which is the sum of its counted rows."""
    group = find_group(est.formula, name)
    collapse = ("weights", "rollout", "training") if name == "peak" else ()
    rows = [Row(0, group_title(name, est), None)]
    for member in group.terms:
        rows += formula_rows(member, est, recipe, depth=1, collapse=collapse)
    total = est.total_gb if name == "peak" else est.phases[name]
    return rows + [Row(0, f"= {'peak' if name == 'peak' else group_title(name, est).split(':')[0]}", total)]


def estimate_table(est: MemoryEstimate, recipe: Recipe, recipe_name: str):
    """The estimate as a rich Table, no wider than 100 columns."""
    from rich.markup import escape
    from rich.table import Table

    t = Table(title=f"echoink-lite plan: peak GPU memory of {escape(recipe_name)} (estimate)", title_justify="left")
    t.add_column("what is in GPU memory", max_width=84)
    t.add_column("GiB", justify="right", width=6)

    def add(row: Row, end_section: bool = False) -> None:
        text = escape("  " * row.depth + row.text)
        if row.gib is None:
            value = ""
        elif row.counted:
            value = f"{row.gib:.2f}"
        else:
            value = f"[dim]({row.gib:.2f})[/]"
            text = f"[dim]{text}[/]"
        if row.text.startswith("=") or (row.depth == 0 and row.gib is None):
            text, value = f"[bold]{text}[/]", f"[bold]{value}[/]" if value else ""
        t.add_row(text, value, end_section=end_section)

    for name in ("weights", "rollout", "training", "peak"):
        rows = section_rows(name, est, recipe)
        for i, row in enumerate(rows):
            add(row, end_section=i == len(rows) - 1)
    verdict = "[green]fits[/]" if est.fits else "[red]does not fit[/]"
    t.add_row(f"budget: {est.gpu_memory_gb:.1f} GiB GPU less {100 * est.headroom:.0f}% headroom; {verdict}",
              f"{est.budget_gb:.2f}")
    return t


def print_estimate(est: MemoryEstimate, recipe: Recipe, console, recipe_name: str = "recipe") -> None:
    console.print(estimate_table(est, recipe, recipe_name))
    console.print(UNITS_LINE, highlight=False)
    console.print(BRACKETS_LINE, highlight=False, markup=False)
    tk = est.tokens
    if "audio" in tk:
        console.print(f"tokens per sequence: prompt ~{tk['prompt']} (text {tk['text']} + audio {tk['audio']} + image "
                      f"{tk['image']}) + completion {tk['completion']} = {tk['sequence']:,}", highlight=False)
    else:
        console.print(f"tokens per sequence: prompt {tk['prompt']} (measured) + completion {tk['completion']} "
                      f"= {tk['sequence']:,}", highlight=False)
    console.print(f"model: {recipe.model.dtype}; sizes from the {est.config_source}"
                  if est.config_source.startswith("bundled") else
                  f"model: {recipe.model.dtype}; sizes from {est.config_source}", highlight=False)
    for n in est.notes:
        console.print(f"[yellow]note:[/] {n}", highlight=False)


# ---------------------------------------------------------------------------------------------------
# The command
# ---------------------------------------------------------------------------------------------------
def schedule_summary(recipe: Recipe) -> tuple[dict[str, Any], str]:
    """(derived numbers for the data, a note on where the row count came from)."""
    n, note = None, ""
    train = Path(recipe.data.train)
    if train.exists():
        try:
            from .data import scan_split

            n = len(scan_split(train, open_media=False).rows)
            if recipe.data.limit_train_rows:
                n = min(n, recipe.data.limit_train_rows)
            note = f"{n} usable rows in {train} (media files not opened)"
        except Exception as err:
            note = f"could not read {train} ({err}); "
    if n is None:
        n = PAPER_TRAIN_ROWS if not recipe.data.limit_train_rows else min(PAPER_TRAIN_ROWS, recipe.data.limit_train_rows)
        note += f"{train} not found: assuming the paper's {PAPER_TRAIN_ROWS} AVQA-R1-6K training rows"
    return recipe.derived(n), note


def print_schedule(recipe: Recipe, est: MemoryEstimate, console) -> None:
    derived, note = schedule_summary(recipe)
    g = recipe.grpo
    steps, per_step = derived["total_steps"], derived["completions_per_step"]
    capped = ", capped by schedule.max_steps" if recipe.schedule.max_steps else ""
    lines = [
        f"schedule: {steps} optimizer steps ({derived['steps_per_epoch']} per epoch x {recipe.schedule.epochs:g} "
        f"epoch(s){capped})",
        f"  each step: {g.prompts_per_step} prompts x {g.group_size} completions = {per_step}, in "
        f"{derived['micro_batches_per_step']} micro-batches of {min(g.micro_batch_size, g.group_size)} "
        f"(completions of one group)",
        f"  and {derived['decode_batches_per_step']} decode batch(es) of up to {est.tokens['rollout_batch']} rows",
        f"  rows: {note}",
        f"rollout tokens per step: at most {derived['rollout_tokens_budget']:,} generated "
        f"({per_step} x {recipe.generation.max_completion_tokens}) over ~{per_step * est.tokens['prompt']:,} prompt tokens",
        f"  whole run: at most {derived['rollout_tokens_budget'] * steps:,} generated tokens",
    ]
    for line in lines:
        console.print(line, highlight=False)


def plan_command(recipe_path: str | Path, overrides: list[str] | tuple[str, ...] = (), *,
                 gpu_memory_gib: float | None = None, headroom: float = DEFAULT_HEADROOM,
                 text_tokens: int = DEFAULT_TEXT_TOKENS, json_out: str | Path | None = None, console=None) -> int:
    """`echoink-lite plan RECIPE [key=value ...] [--gpu-memory 24GB]`: print the estimate and the schedule;
    0 if the recipe fits, 1 if not. `gpu_memory_gib`: None plans for the detected GPU, else 24 GiB."""
    from rich.console import Console

    from .safe_output import PLAN_JSON, check_output_file, write_json_output

    console = console or Console()
    if not 1 <= text_tokens <= CONTEXT_TOKENS:  # a negative count gave a negative estimate that "fits"
        raise RecipeError(f"--text-tokens {text_tokens}: the text tokens per prompt must be between 1 and the model's "
                          f"{CONTEXT_TOKENS}-token context (default {DEFAULT_TEXT_TOKENS}, the paper's prompts)")
    if not 0 <= headroom < 1:
        raise RecipeError(f"--headroom {headroom}: the fraction of the GPU kept free must be at least 0 and under 1 "
                          f"(default {DEFAULT_HEADROOM})")
    recipe = load_recipe(recipe_path, list(overrides))
    if json_out:  # refused before anything is printed: a folder, a recipe, a file that is not an earlier plan
        check_output_file(json_out, PLAN_JSON, "--json")
    source = "--gpu-memory"
    if gpu_memory_gib is None:
        gpu_memory_gib = detected_gpu_memory_gib()
        source = "the detected GPU" if gpu_memory_gib is not None else "no GPU detected: the default"
        gpu_memory_gib = gpu_memory_gib or DEFAULT_GPU_GIB
    try:
        est = estimate_memory(recipe, gpu_memory_gib, headroom=headroom, text_tokens=text_tokens)
    except PlanError as err:
        raise RecipeError(str(err)) from None
    print_estimate(est, recipe, console, Path(recipe_path).name)
    console.print(f"GPU memory: {gpu_memory_gib:.1f} GiB ({source})", highlight=False)
    print_schedule(recipe, est, console)
    if est.fits:
        console.print(f"[green]fits[/]: ~{est.total_gb:.1f} GiB of a {est.budget_gb:.1f} GiB budget "
                      f"({gpu_memory_gib:.1f} GiB less {100 * est.headroom:.0f}% headroom)", highlight=False)
    else:
        console.print(f"[red]does not fit[/]: ~{est.total_gb:.1f} GiB over a {est.budget_gb:.1f} GiB budget", highlight=False)
        if est.suggestions:
            console.print("any one of these makes it fit (as key=value overrides, memory-only knobs first):")
            for s in est.suggestions:
                console.print(f"  {s}\n      [dim]{' '.join(s.overrides)}[/]", highlight=False)
        else:
            console.print("no combination of the usual knobs fits this GPU: use a larger GPU")
    if json_out:
        write_json_output(json_out, est.to_dict(), PLAN_JSON, "--json")
    return 0 if est.fits else 1


# ---------------------------------------------------------------------------------------------------
# Used by `train` before loading the model
# ---------------------------------------------------------------------------------------------------
def check_recipe_fits_gpu(recipe: Recipe, device) -> tuple[bool, str]:
    """(fits, message) for the recipe on `device` (a CUDA device); never raises for planner problems."""
    try:
        import torch

        total = torch.cuda.get_device_properties(device).total_memory / GIB
        name = torch.cuda.get_device_name(device)
    except Exception as err:  # no CUDA: nothing to check
        return True, f"planner: no CUDA device to check ({err})"
    try:
        est = estimate_memory(recipe, total)
    except Exception as err:  # a planner problem must not stop a run
        return True, f"planner: could not estimate memory ({err})"
    if est.fits:
        return True, f"planner: ~{est.total_gb:.1f} GiB of {total:.1f} GiB on {name}"
    lines = [f"planner: this recipe needs ~{est.total_gb:.1f} GiB but {name} has {total:.1f} GiB "
             f"({100 * est.headroom:.0f}% kept as headroom: budget {est.budget_gb:.1f} GiB)."]
    if est.suggestions:
        lines.append("Any one of these makes it fit (as key=value overrides):")
        lines += [f"  {s}" for s in est.suggestions[:5]]
    lines.append("Details: echoink-lite plan RECIPE [key=value ...]")
    return False, "\n".join(lines)


__all__ = [
    "Dims", "MemoryEstimate", "Suggestion", "bundled_thinker_config", "check_recipe_fits_gpu", "count_parameters",
    "estimate_memory", "load_thinker_config", "lora_parameter_count", "nf4_bits_per_param", "plan_command",
    "prompt_token_estimate", "suggest_changes",
]
