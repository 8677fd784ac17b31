"""Every flag that writes a file: never over a file the command did not write, always whole, one-line refusals.

Each test points a command at something it must not replace (a dataset file, a run file, a recipe, a file of
the user's, a folder) and checks the refusal and that the file is byte for byte unchanged; then reruns the
command into its own earlier output, which must work.
"""

from __future__ import annotations

import errno
import io
import json
import os
import shutil
from pathlib import Path

import pytest
from rich.console import Console

from echoink_lite import safe_output
from echoink_lite.cli import main
from echoink_lite.safe_output import OutputError
from test_merge import make_adapter

RECIPES = Path(__file__).resolve().parent.parent / "recipes"


def quiet() -> Console:
    return Console(file=io.StringIO(), width=300, color_system=None)


def one_error_line(capsys, stderr_only: bool = False) -> str:
    """The command's one line of error (commands that print progress first are read on stderr only)."""
    captured = capsys.readouterr()
    text = captured.err if stderr_only else captured.err + captured.out
    lines = [x for x in text.strip().splitlines() if x.strip()]
    assert len(lines) == 1 and "Traceback" not in captured.err, captured.err + captured.out
    return lines[0]


@pytest.fixture
def split_copy(synth_dir, tmp_path):
    out = tmp_path / "data"
    shutil.copytree(synth_dir, out)
    return out


@pytest.fixture
def run_folder(tmp_path):
    """A run folder as `train` leaves it: its recipe, its training log, its curves."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "recipe.yaml").write_text("# echoink-lite train\nlora: {r: 4}\n")
    (run / "metrics.jsonl").write_text('{"step": 1, "reward": 0.5}\n')
    return run


# ---------------------------------------------------------------------------------------------------
# data check --report
# ---------------------------------------------------------------------------------------------------
def test_data_check_report_never_replaces_the_dataset_and_rewrites_its_own_report(split_copy, tmp_path, capsys):
    train = split_copy / "train"
    listing = train / "omni_rl_format_train.json"
    before = listing.read_bytes()
    assert main(["data", "check", str(train), "--report", str(listing)]) == 2
    line = one_error_line(capsys)
    assert str(listing) in line and "dataset's list file" in line and "Fix:" in line
    assert listing.read_bytes() == before
    media = train / "audios" / "sample_0.wav"
    wav = media.read_bytes()
    assert main(["data", "check", str(train), "--report", str(media)]) == 2
    assert "dataset's media file" in one_error_line(capsys) and media.read_bytes() == wav
    notes = tmp_path / "notes.jsonl"  # a file of the user's that merely looks like JSON Lines
    notes.write_text('{"todo": "check rows"}\n')
    assert main(["data", "check", str(train), "--report", str(notes)]) == 2
    assert "was not written by `echoink-lite data check --report`" in one_error_line(capsys)
    assert notes.read_text() == '{"todo": "check rows"}\n'
    # its own report: rewritten on each run (with rows, then empty), nothing left beside it
    report = tmp_path / "bad.jsonl"
    items = json.loads(before)
    items[0]["solution"] = "<answer>Z</answer>"
    listing.write_text(json.dumps(items))
    assert main(["data", "check", str(train), "--report", str(report)]) == 1
    assert json.loads(report.read_text())["reason"] == "solution_not_an_option"
    listing.write_bytes(before)
    assert main(["data", "check", str(train), "--report", str(report)]) == 0
    assert report.read_text() == ""
    assert main(["data", "check", str(train), "--report", str(report)]) == 0  # an empty report is its own too
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.jsonl", "data", "notes.jsonl"]


# ---------------------------------------------------------------------------------------------------
# plan --json
# ---------------------------------------------------------------------------------------------------
def test_plan_json_refuses_a_recipe_and_a_folder_and_rewrites_its_own_json(tmp_path, capsys):
    recipe = tmp_path / "mine.yaml"
    shutil.copy(RECIPES / "paper_24gb.yaml", recipe)
    before = recipe.read_bytes()
    args = ["plan", str(recipe), "--gpu-memory", "80GB"]
    assert main(args + ["--json", str(recipe)]) == 2
    line = one_error_line(capsys)
    assert str(recipe) in line and "not written by `echoink-lite plan --json`" in line and recipe.read_bytes() == before
    assert main(args + ["--json", str(tmp_path)]) == 2
    assert "it is a folder" in one_error_line(capsys)
    out = tmp_path / "missing" / "x.json"  # a new folder is made
    assert main(args + ["--json", str(out)]) == 0
    first = json.loads(out.read_text())
    assert first["echoink_lite_output"] == "plan --json" and first["fits"] is True
    assert main(args + ["--json", str(out), "grpo.group_size=8"]) == 0  # a rerun replaces its own JSON
    assert json.loads(out.read_text()) != first
    capsys.readouterr()
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    assert main(args + ["--json", str(blocker / "x.json")]) == 2
    assert "is a file, not a folder" in one_error_line(capsys)


# ---------------------------------------------------------------------------------------------------
# merge --report, eval --out and the eval summary: refused before the (long) work starts
# ---------------------------------------------------------------------------------------------------
def test_merge_report_over_a_run_file_is_refused_before_merging(run_folder, tmp_path, capsys):
    before = (run_folder / "recipe.yaml").read_bytes()
    out = tmp_path / "merged"
    assert main(["merge", "--adapter", str(tmp_path / "no-adapter"), "--out", str(out),
                 "--report", str(run_folder / "recipe.yaml")]) == 2
    line = one_error_line(capsys)
    assert "a file of the training run" in line and (run_folder / "recipe.yaml").read_bytes() == before
    assert not out.exists()


def test_eval_out_over_the_training_log_or_beside_a_users_file_is_refused(tiny_model_dir, synth_dir, run_folder,
                                                                           tmp_path, capsys):
    log = run_folder / "metrics.jsonl"
    before = log.read_bytes()
    base = ["eval", "--model", str(tiny_model_dir), "--data", str(synth_dir / "valid"), "--max-new-tokens", "2"]
    assert main(base + ["--out", str(log)]) == 2
    assert "the training log of the training run" in one_error_line(capsys) and log.read_bytes() == before
    log.write_text("")  # a run that has not logged its first step yet: still its training log
    assert main(base + ["--out", str(log)]) == 2
    assert "training log" in one_error_line(capsys) and log.read_text() == ""
    mine = tmp_path / "scores.summary.json"  # the summary eval would write beside --out scores.jsonl
    mine.write_text('{"my": "notes"}')
    assert main(base + ["--out", str(tmp_path / "scores.jsonl")]) == 2
    line = one_error_line(capsys)
    assert str(mine) in line and "eval summary" in line and mine.read_text() == '{"my": "notes"}'
    assert not (tmp_path / "scores.jsonl").exists()


# ---------------------------------------------------------------------------------------------------
# plot --out
# ---------------------------------------------------------------------------------------------------
def test_plot_out_a_folder_gets_a_png_inside_and_other_names_are_one_line(run_folder, tmp_path, capsys):
    folder = tmp_path / "pictures"
    folder.mkdir()
    assert main(["plot", str(run_folder), "--out", str(folder)]) == 0
    png = folder / "curves.png"
    assert capsys.readouterr().out.strip() == str(png) and png.read_bytes().startswith(b"\x89PNG")
    assert not (tmp_path / "pictures.png").exists()
    assert main(["plot", str(run_folder), "--out", str(png)]) == 0  # its own PNG: replaced
    capsys.readouterr()
    assert main(["plot", str(run_folder), "--out", str(tmp_path / "x.txt")]) == 2
    assert "pass a path ending in .png" in one_error_line(capsys) and not (tmp_path / "x.txt").exists()
    from PIL import Image

    photo = tmp_path / "holiday.png"  # a PNG that is not the kit's curves
    Image.new("RGB", (4, 4), "red").save(photo)
    before = photo.read_bytes()
    assert main(["plot", str(run_folder), "--out", str(photo)]) == 2
    assert "not written by `echoink-lite plot --out`" in one_error_line(capsys) and photo.read_bytes() == before
    assert main(["plot", str(run_folder), "--out", str(run_folder / "metrics.jsonl")]) == 2
    one_error_line(capsys)


def test_plot_of_metrics_with_values_that_are_not_numbers_is_one_line(run_folder, capsys):
    (run_folder / "metrics.jsonl").write_text('{"step": 1, "reward": 0.5}\n{"step": 2, "reward": {"a": 1}}\n')
    assert main(["plot", str(run_folder)]) == 2
    line = one_error_line(capsys)
    assert "entry 2 (step 2) has reward" in line and "not a number" in line and "metrics.jsonl" in line
    (run_folder / "metrics.jsonl").write_text('[1, 2]\n')
    assert main(["plot", str(run_folder)]) == 2
    assert "entry 1 is not a JSON object" in one_error_line(capsys)
    assert not (run_folder / "curves.png").exists()


# ---------------------------------------------------------------------------------------------------
# A failed write leaves the old file whole
# ---------------------------------------------------------------------------------------------------
def test_a_failed_write_leaves_the_earlier_output_whole_and_no_temporary_file(tmp_path, monkeypatch):
    path = tmp_path / "plan.json"
    safe_output.write_json_output(path, {"a": 1}, safe_output.PLAN_JSON, "--json")
    before = path.read_bytes()

    def full_disk(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", full_disk)
    with pytest.raises(OutputError) as err:
        safe_output.write_json_output(path, {"a": 2}, safe_output.PLAN_JSON, "--json")
    assert "No space left on device" in str(err.value) and "unchanged" in str(err.value) and "\n" not in str(err.value)
    assert path.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["plan.json"]


# ---------------------------------------------------------------------------------------------------
# data synth OUT and tiny OUT
# ---------------------------------------------------------------------------------------------------
def test_data_synth_refuses_a_file_and_a_foreign_folder_and_replaces_its_own_set_cleanly(tmp_path, capsys):
    a_file = tmp_path / "out.txt"
    a_file.write_text("mine")
    assert main(["data", "synth", str(a_file), "--train", "4", "--valid", "4"]) == 2
    assert "is a file, not a folder" in one_error_line(capsys) and a_file.read_text() == "mine"
    real = tmp_path / "avqa"  # somebody's real data
    (real / "train").mkdir(parents=True)
    (real / "train" / "omni_rl_format_train.json").write_text('[{"data_source": "AVQA"}]')
    assert main(["data", "synth", str(real), "--train", "4", "--valid", "4"]) == 2
    line = one_error_line(capsys)
    assert "train/omni_rl_format_train.json" in line and "did not write" in line
    assert (real / "train" / "omni_rl_format_train.json").read_text() == '[{"data_source": "AVQA"}]'
    out = tmp_path / "synth"
    assert main(["data", "synth", str(out), "--train", "8", "--valid", "4"]) == 0
    assert main(["data", "synth", str(out), "--train", "4", "--valid", "4", "--seed", "1"]) == 0  # its own: replaced
    capsys.readouterr()
    assert sorted(p.name for p in (out / "train" / "audios").iterdir()) == [f"sample_{i}.wav" for i in range(4)]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary folder left
    (out / "valid" / "notes.txt").write_text("added by hand")
    assert main(["data", "synth", str(out)]) == 2
    assert "valid/notes.txt" in one_error_line(capsys) and (out / "valid" / "notes.txt").is_file()


def test_tiny_refuses_a_foreign_folder_and_replaces_its_own_model(tmp_path, capsys):
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "weights.bin").write_text("keep")
    assert main(["tiny", str(busy)]) == 2
    assert "weights.bin" in one_error_line(capsys) and sorted(p.name for p in busy.iterdir()) == ["weights.bin"]
    out = tmp_path / "tiny"
    assert main(["tiny", str(out)]) == 0
    assert main(["tiny", str(out)]) == 0  # its own model: replaced whole
    capsys.readouterr()
    assert (out / "model.safetensors.index.json").is_file() and safe_output.folder_marker(out)["kind"] == "tiny"
    (out / "notes.md").write_text("mine")
    assert main(["tiny", str(out)]) == 2
    assert "notes.md" in one_error_line(capsys)


# ---------------------------------------------------------------------------------------------------
# merge onto a full disk; export is whole or nothing
# ---------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def adapter(tiny_model_dir, tmp_path_factory):
    return make_adapter(tiny_model_dir, tmp_path_factory.mktemp("outputs-adapter") / "adapter")


def test_merge_onto_a_full_disk_is_one_line_and_leaves_nothing(adapter, tmp_path, monkeypatch, capsys):
    from safetensors import SafetensorError

    def full_disk(*args, **kwargs):  # what safetensors raises when the disk fills during a shard
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr("safetensors.torch.save_file", full_disk)
    out = tmp_path / "merged"
    assert main(["merge", "--adapter", str(adapter), "--out", str(out), "--no-verify"]) == 2
    line = one_error_line(capsys, stderr_only=True)
    assert "no space left on device while writing" in line and "nothing was left at --out" in line
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_a_failed_export_leaves_nothing_at_out(adapter, tmp_path, monkeypatch):
    from echoink_lite import export
    from echoink_lite.merge_base import MergeError

    def full_disk(src, dst, **kwargs):
        Path(dst).write_bytes(b"half")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(dst))

    monkeypatch.setattr(export.shutil, "copy2", full_disk)
    with pytest.raises(MergeError, match="nothing was left at --out"):
        export.export_adapter(adapter, tmp_path / "export")
    assert sorted(p.name for p in tmp_path.iterdir()) == []


# ---------------------------------------------------------------------------------------------------
# demo --out: only an earlier demo's folder is reused, and a rerun merges over its own earlier merge
# ---------------------------------------------------------------------------------------------------
def _copy_model(src, dst, kind):
    with safe_output.replacing_folder(dst, kind, "test") as tmp:
        for f in src.iterdir():
            if f.name != safe_output.FOLDER_MARKER:
                shutil.copy2(f, tmp / f.name)


def test_a_demo_folder_is_reused_only_when_it_holds_nothing_but_the_demos_files(tiny_model_dir, adapter, tmp_path, capsys):
    from echoink_lite.demo import _claim_demo_folder, check_demo_folder, demo_recipe, merge_into_demo_folder
    from echoink_lite.synth import write_synth_set
    from echoink_lite.warmstart import WARM_START_KIND

    out = tmp_path / "demo"
    check_demo_folder(out)
    _claim_demo_folder(out)  # what a demo leaves, part by part, written by the same functions the demo uses
    write_synth_set(out / "data", 4, 4, 0)
    _copy_model(tiny_model_dir, out / "tiny-model", "tiny")
    _copy_model(tiny_model_dir, out / "warm-model", WARM_START_KIND)
    (out / "run").mkdir()
    (out / "run" / "recipe.yaml").write_text(demo_recipe(out, quick=True).to_yaml())
    (out / "run" / "metrics.jsonl").write_text('{"step": 1}\n')
    (out / "eval").mkdir()
    (out / "eval" / "predictions.jsonl").write_text("")
    assert merge_into_demo_folder(out, adapter, quiet())["ok"] is True
    assert merge_into_demo_folder(out, adapter, quiet())["ok"] is True  # a rerun: over the demo's own merge
    safe_output.write_json_output(out / "demo_summary.json", {"quick": True}, safe_output.DEMO_SUMMARY, "demo summary")
    check_demo_folder(out)  # a rerun is accepted

    for foreign in ("notes.txt", "data/train/notes.txt", "run/mine.txt", "merged/extra.bin", "eval/other.jsonl",
                    "tiny-model/x.txt", "warm-model/y.txt"):
        (out / foreign).write_text("mine")
        with pytest.raises(OutputError) as err:
            check_demo_folder(out)
        assert foreign in str(err.value) and "\n" not in str(err.value)
        (out / foreign).unlink()
    recipe = (out / "run" / "recipe.yaml").read_text()
    (out / "run" / "recipe.yaml").write_text(recipe.replace(str(out / "run"), str(tmp_path / "elsewhere")))
    with pytest.raises(OutputError, match="a run folder this demo did not write"):
        check_demo_folder(out)
    (out / "run" / "recipe.yaml").write_text(recipe)
    (out / "demo_summary.json").write_text('{"mine": 1}')
    with pytest.raises(OutputError, match="demo_summary.json"):
        check_demo_folder(out)

    other = tmp_path / "project"  # not a demo's folder at all: refused before anything is written
    (other / "data").mkdir(parents=True)
    capsys.readouterr()
    assert main(["demo", "--quick", "--out", str(other)]) == 2
    assert "holds data, which `echoink-lite demo` did not write" in one_error_line(capsys, stderr_only=True)
    assert sorted(p.name for p in other.iterdir()) == ["data"]


def test_a_report_onto_its_own_input_or_output_is_refused(tmp_path, capsys):
    rows = tmp_path / "rows.jsonl"  # data check reads JSON Lines too: an empty set would pass the content check
    rows.write_text("")
    assert main(["data", "check", str(rows), "--report", str(rows)]) == 2
    assert "is the data being checked" in one_error_line(capsys)
    out = tmp_path / "merged"
    assert main(["merge", "--adapter", str(tmp_path / "a"), "--out", str(out), "--report", str(out)]) == 2
    assert "is the --out folder" in one_error_line(capsys) and not out.exists()
