"""Which rows each GRPO step trains on: the data order, saved in every checkpoint, and the step's prompts.

The order is one seeded permutation per epoch, cut into steps of `grpo.prompts_per_step` (`data_schedule`).
Every checkpoint keeps it, with the usable rows' fingerprint (`rows_fingerprint`), so a resumed run goes on
in the same order, and a resume on other rows is refused (resume.check_resumable). `step_prompts` loads
and encodes one step's rows; a row that fails is skipped, counted and replaced by the next usable row of the
order (row_skips.py says when that stops the run).
"""

from __future__ import annotations

import hashlib
import json
from typing import TYPE_CHECKING

import numpy as np

from .data import Row, RowEncodeError
from .prompting import Encoded, encode_row
from .recipe import Recipe
from .row_skips import no_prompt_left
from .training_errors import RowsSkippedError

if TYPE_CHECKING:
    from .run_setup import Run


# ---------------------------------------------------------------------------------------------------
# Data order: one seeded permutation per epoch, cut into steps; saved in every checkpoint
# ---------------------------------------------------------------------------------------------------
def data_schedule(n_rows: int, prompts_per_step: int, total_steps: int, seed: int) -> list[list[int]]:
    """Row indices of each step. Epoch e is permutation(seed + e), cut into steps of `prompts_per_step`. Its
    last step holds the prompts left over, filled up with the epoch's first prompts, as the original's data
    loader does: 4,490 prompts on 8 processes give 561 full steps and a 562nd of 2 new prompts plus the
    epoch's first 6 again (HF Trainer's dataloader sharded by accelerate, whose `even_batches`, on by default,
    cycles back to the first indices: accelerate/data_loader.py, BatchSamplerShard._iter_with_no_split)."""
    steps: list[list[int]] = []
    epoch = 0
    while len(steps) < total_steps:
        perm = np.random.default_rng(seed + epoch).permutation(n_rows).tolist()
        for s in range(0, n_rows, prompts_per_step):
            step = perm[s: s + prompts_per_step]
            while len(step) < prompts_per_step:
                step += perm[: prompts_per_step - len(step)]
            steps.append(step)
        epoch += 1
    return steps[:total_steps]


def rows_fingerprint(rows: list[Row]) -> str:
    ids = json.dumps([[str(r.problem_id), r.answer] for r in rows])
    return hashlib.sha256(ids.encode()).hexdigest()[:16]


def saved_schedule(state: dict, recipe: Recipe) -> list[list[int]] | None:
    """The data order a checkpoint's training state holds, or None for a new run."""
    if "data_schedule" in state:
        return state["data_schedule"]
    if "data_order" in state:  # checkpoints written before per-epoch steps: a flat order, full steps
        order, n = state["data_order"], recipe.grpo.prompts_per_step
        return [order[s: s + n] for s in range(0, len(order), n)]
    return None


# ---------------------------------------------------------------------------------------------------
# One step's prompts
# ---------------------------------------------------------------------------------------------------
def step_prompts(run: Run, step: int) -> tuple[list[Row], list[Encoded]]:
    """This process's rows of `step`, loaded and encoded. A row that fails (unreadable or unencodable media,
    a prompt over the cap) is skipped with a one-line warning, counted, remembered, and replaced by the next
    usable row of the data order, so every step keeps its number of prompts. All processes decide the same
    replacements, then each takes every world_size-th prompt."""
    recipe, dst = run.recipe, run.dst
    wanted = run.schedule[step]
    later = [i for s in run.schedule[step + 1:] + run.schedule[:step] for i in s]  # replacements, in data order
    bad = set(run.counters["bad_rows"])
    chosen: list[tuple[Row, Encoded]] = []
    seen: set[int] = set()
    for i in wanted + later:
        if len(chosen) == len(wanted):
            break
        if i in seen or i in bad:
            continue
        seen.add(i)
        row = run.rows[i]
        try:
            chosen.append((row, encode_row(run.processor, row, max_audio_seconds=recipe.data.max_audio_seconds,
                                           max_pixels=recipe.data.max_pixels,
                                           max_prompt_tokens=recipe.generation.max_prompt_tokens)))
        except RowEncodeError as err:
            bad.add(i)
            run.counters["bad_rows"].append(i)
            run.counters["skipped_rows"] += 1
            reasons = run.counters.setdefault("skip_reasons", {})
            reasons[err.reason] = reasons.get(err.reason, 0) + 1
            if dst.main:
                run.console.print(f"step {step + 1}: skipped ({err.reason}), replaced by the next row of the data "
                                  f"order: {err}", style="yellow", highlight=False, markup=False)
            problem = run.skip_budget and run.skip_budget.problem(run.counters["skipped_rows"], reasons)
            if problem:  # all processes skip the same rows, so all stop here together
                raise RowsSkippedError(f"step {step + 1}: {problem}")
    if not chosen:
        raise RowsSkippedError(f"step {step + 1}: " + no_prompt_left(run.counters["skipped_rows"],
                                                                      run.counters.get("skip_reasons", {}), recipe.data.train))
    mine = chosen[dst.rank:: dst.world]
    return [r for r, _ in mine], [e for _, e in mine]
