"""A run whose rows cannot be loaded stops with a TrainingError that names the cause, exits non-zero and keeps
its finished steps, instead of reporting "done" with an adapter that trained on nothing.

Before: with every row undecodable (the issue's `data.max_audio_seconds=0.001`, or a NaN in every wav), each
step had 0 completions and the run ended "done: 3 steps", exit 0, with an adapter.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from echoink_lite import checkpoints as ckpt
from echoink_lite.cli import main
from echoink_lite.data import SplitScan, scan_split
from echoink_lite.grpo import TrainingError, train
from echoink_lite.row_skips import SkipBudget, nonfinite_rows_note
from echoink_lite.step_data import data_schedule
from test_grpo import tiny_recipe

TINY_RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "tiny_cpu.yaml"


def poison(split: Path, indices) -> None:
    """Put a NaN into the audio of these rows: the scan before training passes them, the loader does not."""
    rows = {r.index: r for r in scan_split(split, open_media=False).rows}
    for i in indices:
        samples, rate = sf.read(rows[i].audio_path, dtype="float32")
        samples[len(samples) // 2] = np.nan
        sf.write(rows[i].audio_path, samples, rate, subtype="FLOAT")


@pytest.fixture
def nan_train(synth_dir, tmp_path):
    split = tmp_path / "train"
    shutil.copytree(synth_dir / "train", split)
    poison(split, range(16))
    return split


def cli_train(tiny_model_dir, split, out, *extra):
    return main(["train", str(TINY_RECIPE), f"model.name_or_path={tiny_model_dir}", f"data.train={split}",
                 "data.valid=null", f"checkpoint.output_dir={out}", "schedule.max_steps=3", "grpo.prompts_per_step=2",
                 "grpo.group_size=2", "grpo.micro_batch_size=2", "grpo.rollout_batch_size=2", "logging.progress=false",
                 *extra])


def test_every_row_undecodable_stops_the_run_with_exit_2(tiny_model_dir, nan_train, tmp_path, capsys):
    out = tmp_path / "run"
    assert cli_train(tiny_model_dir, nan_train, out) == 2
    captured = capsys.readouterr()
    error = captured.err.strip().splitlines()[-1]  # after transformers' "Loading weights" bar
    assert error.startswith("echoink-lite train: error: step 1: 1 training rows could not be loaded so far "
                            "(nonfinite_audio: 1): 1 of 16 rows are unusable, 6.2% > data.max_bad_fraction 2.0%")
    assert f"echoink-lite data check {nan_train}" in error and "\n" not in error
    assert "No step had finished; nothing was saved." in error
    assert "done" not in captured.out and not (out / "adapter").exists()


def test_a_step_with_no_prompt_left_stops_the_run_even_if_bad_rows_are_allowed(tiny_model_dir, nan_train, tmp_path, capsys):
    out = tmp_path / "run"
    assert cli_train(tiny_model_dir, nan_train, out, "data.max_bad_fraction=1.0") == 2
    captured = capsys.readouterr()
    assert "step 1: no prompt left to train on: every row this step could take was skipped" in captured.err
    assert "nonfinite_audio" in captured.err and "done" not in captured.out and not (out / "adapter").exists()


def test_a_run_over_its_bad_fraction_stops_mid_run_keeping_the_finished_steps(tiny_model_dir, synth_dir, tmp_path):
    split = tmp_path / "train"
    shutil.copytree(synth_dir / "train", split)
    out = tmp_path / "run"
    recipe = tiny_recipe(tiny_model_dir, synth_dir, out, schedule__max_steps=3, data__max_bad_fraction=0.1,
                         data__train=str(split), checkpoint__save_every_steps=10)
    rows = scan_split(split).rows
    steps = data_schedule(len(rows), recipe.grpo.prompts_per_step, 3, recipe.schedule.seed)
    poison(split, [rows[i].index for i in steps[1]])  # both rows of step 2: 2 of 16 = 12.5% > 10%

    with pytest.raises(TrainingError) as err:
        train(recipe)
    msg = str(err.value)
    assert msg.startswith("step 2: 2 training rows could not be loaded so far (nonfinite_audio: 2): 2 of 16 rows")
    assert "12.5% > data.max_bad_fraction 10.0%" in msg and "The 1 finished steps are saved." in msg
    assert ckpt.latest_checkpoint(out).name == "step-000001" and not (out / "adapter").exists()

    # raising the limit (not part of the training math) resumes; the two rows stay skipped, counted once
    looser = tiny_recipe(tiny_model_dir, synth_dir, out, schedule__max_steps=3, data__max_bad_fraction=0.2,
                         data__train=str(split), checkpoint__save_every_steps=10)
    res = train(looser, resume="auto")
    assert res.steps_done == 3 and res.skipped_rows == 2 and (out / "adapter").is_dir()
    logged = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["skipped_rows"] for r in logged] == [0, 2, 2]


def _scan(total, rejected_indices, usable_indices):
    from echoink_lite.data import Reject, Row

    rows = [Row(i, "q", ("A. a", "B. b"), "A", "A", Path("i"), Path("a"), None, i) for i in usable_indices]
    rejects = [Reject(i, i, "missing_file", "") for i in rejected_indices]
    return SplitScan(Path("split"), Path("split/x.json"), rows, rejects, total)


def test_the_bad_share_counts_scan_rejects_and_skips_over_the_rows_read():
    scan = _scan(100, [5], [i for i in range(100) if i != 5])
    budget = SkipBudget.for_run(scan, scan.rows, 0.02)
    assert (budget.rows_read, budget.rejected_by_scan) == (100, 1)
    assert budget.problem(1, {"x": 1}) is None  # 2 of 100
    assert "3 of 100 rows are unusable, 3.0% > data.max_bad_fraction 2.0%" in budget.problem(2, {"x": 2})
    # data.limit_train_rows=10: the rows read are the first 11 (row 5 was rejected among them)
    limited = SkipBudget.for_run(scan, scan.rows[:10], 0.1)
    assert (limited.rows_read, limited.rejected_by_scan) == (11, 1)
    assert limited.problem(0, {}) is None and limited.problem(1, {"x": 1}) is not None  # 2 of 11 > 10%


def test_the_nonfinite_advice_names_a_row_common_to_the_streak():
    assert nonfinite_rows_note([]) == ""
    note = nonfinite_rows_note([["3", "7"], ["9", "3"], ["3", "1"]])
    assert "Row(s) 3 were in each of these 3 steps: their data may be the cause" in note
    assert note.endswith("Rows of the last non-finite step: 3, 1.")
    assert "data may be the cause" not in nonfinite_rows_note([["3", "7"], ["9", "2"]])
