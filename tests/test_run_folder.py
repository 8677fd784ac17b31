"""One `train` per run folder (the lock), and never a run folder on its own data or model.

Every refusal here happens before the model is loaded, so these tests run `train` for real and stay fast.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time

import pytest

from echoink_lite import run_folder
from echoink_lite.cli import main
from echoink_lite.grpo import train
from echoink_lite.run_folder import RUN_RECIPE_HEADER, acquire_run_lock, check_apart_from_inputs
from test_grpo import tiny_recipe

LOCK = "train.lock"


def _snapshot(folder):
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _write_lock(run, pid, host=None, process_start=None):
    run.mkdir(parents=True, exist_ok=True)
    info = {"pid": pid, "host": host or socket.gethostname(), "started": time.time() - 60,
            "process_start": process_start, "token": "someone-else"}
    (run / LOCK).write_text(json.dumps(info))
    return info


@pytest.fixture
def sleeper():
    """A live process that is not this one (the holder of a lock)."""
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    yield proc
    proc.kill()
    proc.wait()


def _dead_pid():
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _cli_one_line(capsys):
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


# ---------------------------------------------------------------------------------------------------
# The lock
# ---------------------------------------------------------------------------------------------------
def test_the_lock_holds_pid_and_host_refuses_a_second_holder_and_is_released(tmp_path):
    run = tmp_path / "new" / "run"
    lock = acquire_run_lock(run, note=pytest.fail)
    info = json.loads((run / LOCK).read_text())
    assert info["pid"] == os.getpid() and info["host"] == socket.gethostname()
    with pytest.raises(run_folder.RunFolderError) as err:
        acquire_run_lock(run, note=pytest.fail)
    msg = str(err.value)
    assert "\n" not in msg and f"pid {os.getpid()} on host {socket.gethostname()}" in msg and str(run / LOCK) in msg
    lock.release()
    assert not run.exists()  # the folder it made, still empty, goes too: a refused start leaves nothing


def test_a_stale_lock_on_this_host_is_named_and_taken_over(tmp_path):
    run = tmp_path / "run"
    dead = _dead_pid()
    _write_lock(run, dead)
    notes = []
    lock = acquire_run_lock(run, note=notes.append)
    assert len(notes) == 1 and f"took over the stale lock {run / LOCK}" in notes[0]
    assert f"pid {dead}" in notes[0] and "its process no longer runs" in notes[0]
    assert json.loads((run / LOCK).read_text())["pid"] == os.getpid()
    lock.release()
    # a pid that was reused by a later process: its start time differs from the one the lock recorded
    _write_lock(run, os.getpid(), process_start="1")
    lock = acquire_run_lock(run, note=notes.append)
    assert "the pid now belongs to another process" in notes[-1]
    lock.release()


def test_a_lock_from_another_host_is_stale_only_after_its_heartbeat_stops(tmp_path):
    run = tmp_path / "run"
    _write_lock(run, 12345, host="colab-runtime-1")
    with pytest.raises(run_folder.RunFolderError, match="pid 12345 on host colab-runtime-1"):
        acquire_run_lock(run, note=pytest.fail)
    old = time.time() - run_folder.STALE_AFTER_S - 60
    os.utime(run / LOCK, (old, old))
    notes = []
    acquire_run_lock(run, note=notes.append).release()
    assert "has not touched it for 11 minutes" in notes[0]


def test_overwrite_moves_the_lock_to_the_new_folder(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text('{"step": 1}\n')
    lock = acquire_run_lock(run, note=pytest.fail)
    moved = run_folder.prepare_run_dir(run, resuming=False, overwrite=True, recipe_text="x: 1\n", note=lambda m: None, lock=lock)
    assert not (moved / LOCK).exists() and lock.held()
    assert (run / "recipe.yaml").read_text() == RUN_RECIPE_HEADER + "x: 1\n"
    lock.release()
    assert sorted(p.name for p in run.iterdir()) == ["recipe.yaml"]


def test_a_second_train_into_a_locked_folder_is_refused_in_one_line(tiny_model_dir, synth_dir, tmp_path, sleeper, capsys):
    run = tmp_path / "run"
    _write_lock(run, sleeper.pid)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(tiny_recipe(tiny_model_dir, synth_dir, run).to_yaml())
    before = _snapshot(run)
    assert main(["train", str(recipe)]) == 2
    err = _cli_one_line(capsys)
    assert "is in use by another echoink-lite train" in err and f"pid {sleeper.pid}" in err
    assert _snapshot(run) == before  # no recipe.yaml, no metrics.jsonl


@pytest.mark.parametrize("stop", [KeyboardInterrupt, RuntimeError])
def test_the_lock_is_released_when_train_stops_on_an_error_or_ctrl_c(tiny_model_dir, synth_dir, tmp_path, monkeypatch, stop):
    from echoink_lite import grpo

    seen = []

    def stopping_scan(*args, **kwargs):
        seen.append((tmp_path / "run" / LOCK).is_file())  # held while the run works
        raise stop("stopped")

    monkeypatch.setattr(grpo, "scan_split", stopping_scan)
    with pytest.raises(stop):
        train(tiny_recipe(tiny_model_dir, synth_dir, tmp_path / "run"))
    assert seen == [True] and not (tmp_path / "run").exists()


# ---------------------------------------------------------------------------------------------------
# Never on the data or the model
# ---------------------------------------------------------------------------------------------------
def test_an_output_dir_on_a_split_or_the_model_is_refused(tiny_model_dir, synth_dir, tmp_path):
    train_split, valid_split = synth_dir / "train", synth_dir / "valid"
    cases = {train_split: "is the training split", train_split / "runs" / "x": "is inside the training split",
             synth_dir: "contains the training split", valid_split: "is the validation split",
             tiny_model_dir: "is the model folder", tiny_model_dir / "run": "is inside the model folder"}
    for out, relation in cases.items():
        with pytest.raises(run_folder.RunFolderError) as err:
            check_apart_from_inputs(tiny_recipe(tiny_model_dir, synth_dir, out))
        assert f"checkpoint.output_dir {out} {relation}" in str(err.value) and "\n" not in str(err.value)
    check_apart_from_inputs(tiny_recipe(tiny_model_dir, synth_dir, tmp_path / "run"))  # beside them: fine
    listed = tiny_recipe(tiny_model_dir, synth_dir, train_split, data__train=str(train_split / "omni_rl_format_train.json"))
    with pytest.raises(run_folder.RunFolderError, match="is the training split"):
        check_apart_from_inputs(listed)  # a split named by its list file


def test_overwrite_onto_the_training_split_is_refused_before_anything_moves(tiny_model_dir, synth_dir, tmp_path, capsys):
    data = tmp_path / "data"
    shutil.copytree(synth_dir, data)
    (data / "train" / "metrics.jsonl").write_text('{"step": 1}\n')  # what made --overwrite move the split aside
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(tiny_recipe(tiny_model_dir, data, data / "train").to_yaml())
    before = _snapshot(data)
    assert main(["train", str(recipe), "--overwrite"]) == 2
    err = _cli_one_line(capsys)
    assert f"checkpoint.output_dir {data / 'train'} is the training split" in err and "Fix:" in err
    assert _snapshot(data) == before and sorted(p.name for p in tmp_path.iterdir()) == ["data", "recipe.yaml"]


def test_a_recipe_of_the_users_in_the_run_folder_is_never_replaced(tiny_model_dir, synth_dir, tmp_path, capsys):
    run = tmp_path / "exp1"
    run.mkdir()
    mine = "# my notes on this experiment\nlora: {r: 4}\n"
    (run / "recipe.yaml").write_text(mine)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(tiny_recipe(tiny_model_dir, synth_dir, run).to_yaml())
    assert main(["train", str(recipe)]) == 2
    err = _cli_one_line(capsys)
    assert f"{run / 'recipe.yaml'} was not written by echoink-lite train" in err
    assert (run / "recipe.yaml").read_text() == mine and sorted(p.name for p in run.iterdir()) == ["recipe.yaml"]
    # the kit's own recipe.yaml of a start refused before step 1 is replaced as before
    (run / "recipe.yaml").write_text(RUN_RECIPE_HEADER + "lora: {r: 4}\n")
    run_folder.check_own_run_files(run)
