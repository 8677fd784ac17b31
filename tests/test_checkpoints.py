"""Run folders and checkpoints: nothing a user does (or a disk, or a cloud sync) loses or mixes a run.

One real two-step run on the tiny model (a checkpoint after each step) is made once; each test damages
or reuses a copy of it.
"""

import errno
import json
import os
import pathlib
import re
import shlex
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import load as load_bytes
from safetensors.torch import load_file

from echoink_lite import checkpoints as ckpt
from echoink_lite.cli import main
from echoink_lite.evaluate import EvalError, _read_done
from echoink_lite.grpo import train
from echoink_lite.metrics import MetricsWriter, read_metrics
from echoink_lite.resume import check_resumable, load_state, read_rank_rng, resolve_resume
from echoink_lite.run_folder import RUN_RECIPE_HEADER, RunFolderError, check_run_dir, prepare_run_dir
from test_grpo import tiny_recipe

ADAPTER = "adapter/adapter_model.safetensors"


def two_step_recipe(model_dir, synth_dir, out, **over):
    return tiny_recipe(model_dir, synth_dir, out, schedule__max_steps=2, checkpoint__save_every_steps=1, **over)


@pytest.fixture(scope="module")
def finished_run(tiny_model_dir, synth_dir, tmp_path_factory):
    """A finished two-step run with complete checkpoints at steps 1 and 2."""
    out = tmp_path_factory.mktemp("finished") / "run"
    train(two_step_recipe(tiny_model_dir, synth_dir, out))
    assert [s for s, _ in ckpt.complete_checkpoints(out)] == [1, 2]
    return out


@pytest.fixture
def run_copy(finished_run, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(finished_run, out)
    return out


def _snapshot(folder):
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# ---------------------------------------------------------------------------------------------------
# A. A folder that holds an earlier run
# ---------------------------------------------------------------------------------------------------
def test_a_fresh_start_over_an_earlier_run_is_refused_and_changes_nothing(tiny_model_dir, synth_dir, run_copy):
    before = _snapshot(run_copy)
    with pytest.raises(RunFolderError) as err:
        train(two_step_recipe(tiny_model_dir, synth_dir, run_copy))
    msg = str(err.value)
    assert "\n" not in msg and str(run_copy) in msg
    for offer in ("--resume auto", "checkpoint.output_dir", "--overwrite", "metrics.jsonl", "step-000002"):
        assert offer in msg
    assert _snapshot(run_copy) == before


def test_the_command_line_refuses_in_one_line_and_takes_overwrite(tiny_model_dir, synth_dir, run_copy, tmp_path, capsys):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(two_step_recipe(tiny_model_dir, synth_dir, run_copy).to_yaml())
    assert main(["train", str(recipe)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "holds an earlier run" in err and "--overwrite" in err
    assert main(["train", str(recipe), "--overwrite", "--resume", "auto"]) == 2
    assert "pass only one of them" in capsys.readouterr().err


def test_run_folder_checks_in_isolation(tmp_path):
    run = tmp_path / "run"
    check_run_dir(run, resuming=False, overwrite=False)  # nothing there yet
    (run / "checkpoints").mkdir(parents=True)
    (run / "recipe.yaml").write_text("x: 1\n")  # a run refused before step 1 made no progress
    (run / "metrics.jsonl").write_text("")
    check_run_dir(run, resuming=False, overwrite=False)
    (run / "metrics.jsonl").write_text('{"step": 1}\n')
    with pytest.raises(RunFolderError, match="holds an earlier run"):
        check_run_dir(run, resuming=False, overwrite=False)
    check_run_dir(run, resuming=True, overwrite=False)
    with pytest.raises(RunFolderError, match="only one of them"):
        check_run_dir(run, resuming=True, overwrite=True)
    notes = []
    moved = prepare_run_dir(run, resuming=False, overwrite=True, recipe_text="y: 2\n", note=notes.append)
    assert moved.name.startswith("run.old-") and (moved / "metrics.jsonl").read_text() == '{"step": 1}\n'
    assert str(moved) in notes[0]
    assert sorted(p.name for p in run.iterdir()) == ["recipe.yaml"]
    assert (run / "recipe.yaml").read_text() == RUN_RECIPE_HEADER + "y: 2\n"


def test_an_unwritable_output_dir_is_one_line_naming_it(tiny_model_dir, synth_dir, tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(tiny_recipe(tiny_model_dir, synth_dir, blocker / "run").to_yaml())
    assert main(["train", str(recipe)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(blocker / "run") in err and "checkpoint.output_dir" in err
    assert "Traceback" not in err
    # a file where the run folder should be
    assert main(["train", str(recipe), f"checkpoint.output_dir={blocker}"]) == 2
    assert "is a file" in capsys.readouterr().err


def test_a_read_only_output_dir_is_one_line_naming_it(tmp_path, monkeypatch):
    def refuse(self, *args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied", str(self))

    monkeypatch.setattr(pathlib.Path, "mkdir", refuse)
    with pytest.raises(RunFolderError) as err:
        prepare_run_dir(tmp_path / "run", resuming=False, overwrite=False, recipe_text="x: 1\n")
    assert str(err.value) == f"cannot write {tmp_path / 'run'}: Permission denied. Choose a writable checkpoint.output_dir."


# ---------------------------------------------------------------------------------------------------
# B. A refused resume writes nothing
# ---------------------------------------------------------------------------------------------------
def test_a_refused_resume_leaves_the_run_folder_untouched(tiny_model_dir, synth_dir, run_copy):
    before = _snapshot(run_copy)
    with pytest.raises(ckpt.ResumeError) as err:
        train(two_step_recipe(tiny_model_dir, synth_dir, run_copy, schedule__learning_rate=5e-3), resume="auto")
    assert "schedule.learning_rate: 0.01 -> 0.005" in str(err.value) and "\n" not in str(err.value)
    assert _snapshot(run_copy) == before  # recipe.yaml still holds the recipe the checkpoints were made with


def test_check_resumable_names_what_changed(finished_run, tiny_model_dir, synth_dir):
    path = ckpt.latest_checkpoint(finished_run)
    state = load_state(path)
    recipe = two_step_recipe(tiny_model_dir, synth_dir, finished_run)
    check_resumable(state, path, recipe, state["data_fingerprint"], 1)
    with pytest.raises(ckpt.ResumeError, match="training rows differ"):
        check_resumable(state, path, recipe, "another-fingerprint", 1)
    with pytest.raises(ckpt.ResumeError, match="written by 1 process.*this run has 2"):
        check_resumable(state, path, recipe, state["data_fingerprint"], 2)


# ---------------------------------------------------------------------------------------------------
# C. Damaged checkpoints that still have their marker
# ---------------------------------------------------------------------------------------------------
def _truncate(path, keep_fraction=0.5):
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep_fraction)])


def _garbage_in_adapter_tensors(path):
    """4 KB of random bytes inside the tensor data: same size, header intact, loads without error."""
    data = bytearray(path.read_bytes())
    header_end = 8 + int.from_bytes(data[:8], "little")
    assert len(data) - header_end > 4096 + 64
    data[header_end + 64: header_end + 64 + 4096] = os.urandom(4096)
    path.write_bytes(bytes(data))


DAMAGE = {
    "truncated adapter": (ADAPTER, _truncate),
    "truncated optimizer": ("optimizer.safetensors", _truncate),
    "empty state.json": ("state.json", lambda p: p.write_text("")),
    "garbage inside adapter tensors": (ADAPTER, _garbage_in_adapter_tensors),
}


def test_the_marker_records_size_and_sha256_of_every_file(finished_run):
    path = ckpt.latest_checkpoint(finished_run)
    manifest = ckpt.read_marker(path)
    files = sorted(p.relative_to(path).as_posix() for p in path.rglob("*") if p.is_file() and p.name != ckpt.MARKER)
    assert sorted(manifest["files"]) == files and ADAPTER in files and "rng-rank0.safetensors" in files
    for rel, want in manifest["files"].items():
        assert want == ckpt.file_digest(path / rel)
    assert ckpt.verify_checkpoint(path) is True


def test_garbage_in_adapter_tensors_loads_silently_without_the_manifest(run_copy):
    """Why the manifest is needed: safetensors has no checksums, so this damage loads as valid weights."""
    path = ckpt.latest_checkpoint(run_copy)
    # load_bytes copies: load_file may map the file, and the in-place damage would then show in `good` too
    good = load_bytes((path / ADAPTER).read_bytes())
    _garbage_in_adapter_tensors(path / ADAPTER)
    bad = load_file(str(path / ADAPTER))
    assert good.keys() == bad.keys() and any(not torch.equal(good[k], bad[k]) for k in good)
    with pytest.raises(ckpt.DamagedCheckpointError, match="SHA-256"):
        ckpt.verify_checkpoint(path)


@pytest.mark.parametrize("case", list(DAMAGE))
def test_a_damaged_newest_checkpoint_falls_back_to_the_newest_intact_one(run_copy, case):
    rel, damage = DAMAGE[case]
    newest = run_copy / "checkpoints" / "step-000002"
    damage(newest / rel)
    warnings = []
    assert resolve_resume("auto", run_copy, warn=warnings.append) == run_copy / "checkpoints" / "step-000001"
    assert len(warnings) == 1 and "\n" not in warnings[0]
    assert str(newest / rel) in warnings[0] and "step-000001" in warnings[0]
    # asked for by path, the damaged checkpoint is refused, naming the file
    with pytest.raises(ckpt.ResumeError) as err:
        resolve_resume(str(newest), run_copy, warn=warnings.append)
    assert str(newest / rel) in str(err.value) and "--resume auto" in str(err.value)


def test_no_intact_checkpoint_is_refused_clearly(run_copy):
    for step in (1, 2):
        _truncate(run_copy / "checkpoints" / f"step-{step:06d}" / "optimizer.safetensors")
    with pytest.raises(ckpt.ResumeError) as err:
        resolve_resume("auto", run_copy, warn=lambda m: None)
    msg = str(err.value)
    assert msg.startswith("no intact checkpoint in") and "\n" not in msg
    assert "step-000001/optimizer.safetensors" in msg and "step-000002/optimizer.safetensors" in msg and "--overwrite" in msg


def test_resume_skips_a_damaged_checkpoint_and_continues_exactly(tiny_model_dir, synth_dir, finished_run, run_copy, capsys):
    damaged = run_copy / "checkpoints" / "step-000002"
    _garbage_in_adapter_tensors(damaged / ADAPTER)
    res = train(two_step_recipe(tiny_model_dir, synth_dir, run_copy), resume="auto")
    out = " ".join(capsys.readouterr().out.split())  # rich may wrap the plan and status lines
    assert f"checkpoint step-000002 is damaged: {damaged / ADAPTER} does not match the SHA-256" in out
    assert "resumed from" in out
    assert res.steps_done == 2
    # step 2 was trained again from step 1: the same weights as the uninterrupted run
    a = load_file(str(finished_run / ADAPTER))
    b = load_file(str(run_copy / ADAPTER))
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)
    # the damaged checkpoint was moved aside (kept for inspection), the new step 2 verifies
    aside = list((run_copy / "checkpoints").glob("set-aside-*/step-000002"))
    assert len(aside) == 1
    assert ckpt.verify_checkpoint(run_copy / "checkpoints" / "step-000002") is True
    assert [m["step"] for m in read_metrics(run_copy)] == [1, 2]


def test_a_marker_without_manifest_is_still_read_with_a_note(run_copy):
    newest = run_copy / "checkpoints" / "step-000002"
    (newest / ckpt.MARKER).write_text("2\n")  # what earlier versions wrote
    notes = []
    assert resolve_resume("auto", run_copy, warn=notes.append) == newest
    assert len(notes) == 1 and "no file checksums" in notes[0]
    # completeness is still checked: a truncated file is found without the manifest
    _truncate(newest / "optimizer.safetensors")
    assert resolve_resume("auto", run_copy, warn=notes.append).name == "step-000001"
    assert f"{newest / 'optimizer.safetensors'} has " in notes[-1] and "its header describes" in notes[-1]


def test_newer_checkpoints_are_set_aside_when_resuming_an_older_one(run_copy):
    notes = []
    prepare_run_dir(run_copy, resuming=True, overwrite=False, resume_step=1, note=notes.append)
    assert [s for s, _ in ckpt.complete_checkpoints(run_copy)] == [1]
    assert "step-000002" in notes[0] and "set-aside-" in notes[0]


# ---------------------------------------------------------------------------------------------------
# Saving: fsync before the marker; a full disk
# ---------------------------------------------------------------------------------------------------
class _Adapter:
    """Stands in for the PEFT model: save_pretrained writes a small safetensors file (real format)."""

    def __init__(self):
        self.layer = torch.nn.Linear(8, 8)

    def save_pretrained(self, folder, safe_serialization=True):
        from safetensors.torch import save_file

        folder.mkdir(parents=True, exist_ok=True)
        save_file({"w": self.layer.weight.detach().clone()}, str(folder / "adapter_model.safetensors"))
        (folder / "adapter_config.json").write_text("{}")


def _save(run_dir, step, model=None):
    model = model or _Adapter()
    opt = torch.optim.AdamW(model.layer.parameters())
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    tmp = ckpt.begin_save(run_dir, step)
    ckpt.save_rank_rng(tmp, 0)
    return ckpt.finish_save(run_dir, tmp, step, model, opt, sched, {"total_steps": 9}, keep_last=3)


def test_files_and_folders_are_synced_before_the_marker(tmp_path, monkeypatch):
    events = []
    real_fsync = os.fsync

    def recording_fsync(fd):
        events.append(os.readlink(f"/proc/self/fd/{fd}"))
        return real_fsync(fd)

    monkeypatch.setattr(os, "fsync", recording_fsync)
    final = _save(tmp_path, 5)
    tmp = str(ckpt.tmp_path_for(tmp_path, 5))
    marker_at = next(i for i, p in enumerate(events) if re.search(r"/\.COMPLETE\.tmp-[^/]+$", p))  # write_bytes_atomic's name
    before_marker = set(events[:marker_at])
    for rel in ckpt.read_marker(final)["files"]:
        assert f"{tmp}/{rel}" in before_marker, f"{rel} not synced before the marker"
    assert tmp in before_marker and f"{tmp}/adapter" in before_marker
    assert str(final.parent) in events[marker_at:]  # the rename into place is synced too


@pytest.mark.parametrize("failing", ["optimizer.safetensors", "adapter"])
def test_a_full_disk_during_a_save_says_so_and_keeps_the_previous_checkpoint(tmp_path, monkeypatch, failing):
    from safetensors import SafetensorError

    previous = _save(tmp_path, 1)
    real_save_tree = ckpt.save_tree
    full = SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    def full_disk_save_tree(obj, path):
        if path.name == failing:
            raise full
        real_save_tree(obj, path)

    class FullDiskAdapter(_Adapter):
        def save_pretrained(self, folder, safe_serialization=True):
            raise full

    monkeypatch.setattr(ckpt, "save_tree", full_disk_save_tree)
    with pytest.raises(ckpt.SaveError) as err:
        _save(tmp_path, 2, FullDiskAdapter() if failing == "adapter" else None)
    written = ckpt.tmp_path_for(tmp_path, 2) / failing
    assert str(err.value).startswith(f"no space left on device while writing {written}; "
                                     f"the previous checkpoint {previous} is intact")
    assert not ckpt.tmp_path_for(tmp_path, 2).exists()  # the partial save is removed to give space back
    assert resolve_resume("auto", tmp_path, warn=pytest.fail) == previous


def test_a_state_file_write_that_the_disk_refuses_is_one_line(tmp_path):
    """A real failed write (a file size limit: the kernel answers EFBIG), not a stand-in: safetensors reports
    it as SafetensorError, and the checkpoint writer turns it into its one-line SaveError."""
    code = textwrap.dedent(f"""
        import resource, signal, pathlib
        from echoink_lite import checkpoints as ckpt
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))
        tmp = ckpt.begin_save(pathlib.Path({str(tmp_path)!r}), 3)
        try:
            ckpt.save_rank_rng(tmp, 0)
        except ckpt.SaveError as err:
            print("SaveError:", err)
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env=dict(os.environ, PYTHONPATH=str(pathlib.Path(__file__).parent.parent)))
    assert proc.returncode == 0, proc.stderr[-2000:]
    line = proc.stdout.strip()
    assert line.startswith("SaveError: cannot write (") and "rng-rank0.safetensors" in line
    assert "no earlier checkpoint of this run exists" in line and "\n" not in line


# ---------------------------------------------------------------------------------------------------
# D. A torn last line in metrics.jsonl and in eval predictions
# ---------------------------------------------------------------------------------------------------
def test_metrics_with_a_torn_last_line_resume(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "reward": 0.5}\n{"step": 2, "reward": 0.6}\n{"step": 3, "rew')
    notes = []
    MetricsWriter(tmp_path, [], None, resume_step=2, note=notes.append).close()
    assert path.read_text() == '{"step": 1, "reward": 0.5}\n{"step": 2, "reward": 0.6}\n'
    assert len(notes) == 1 and "half-written last line" in notes[0]
    path.write_text('{"step": 1}\n{"step": 2, "rew\n{"step": 3}\n')
    with pytest.raises(ckpt.ResumeError) as err:
        MetricsWriter(tmp_path, [], None, resume_step=2)
    assert str(err.value).startswith(f"{path}, line 2: not valid JSON")
    path.write_text('{"step": 1}\n{"st')
    assert read_metrics(tmp_path) == [{"step": 1}]


def test_eval_predictions_with_a_torn_last_line_are_repaired(tmp_path):
    path = tmp_path / "predictions.jsonl"
    done = {"label": "base", "settings": "s1", "problem_id": 7, "sample": 0, "correct": True}
    path.write_text(json.dumps(done) + "\n" + '{"label": "base", "settings": "s1", "problem_id": 8, "sam')
    assert list(_read_done(path, "base", "s1")) == [("7", 0)]
    assert path.read_text() == json.dumps(done) + "\n"  # strict JSONL readers work again
    assert [json.loads(line) for line in path.read_text().splitlines()] == [done]
    path.write_text('{"label": "base", "sett\n' + json.dumps(done) + "\n")
    with pytest.raises(EvalError, match=r"predictions.jsonl, line 1: not valid JSON"):
        _read_done(path, "base", "s1")


# ---------------------------------------------------------------------------------------------------
# E. Nothing in a checkpoint runs code
# ---------------------------------------------------------------------------------------------------
class _Payload:
    """Unpickling this runs `touch MARKER`: what a crafted checkpoint file would do."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {shlex.quote(str(self.marker))}",)


def _rewrite_marker(ckpt_dir):
    """What whoever writes the folder can do: a manifest that matches the altered files."""
    files = ckpt.build_manifest(ckpt_dir, fsync=False)
    (ckpt_dir / ckpt.MARKER).write_text(json.dumps({"format": 1, "step": 2, "files": files}))


@pytest.mark.parametrize("stem", ["rng-rank0", "optimizer", "scheduler"])
def test_a_crafted_pickle_in_a_checkpoint_never_runs_and_resume_is_refused_in_one_line(
        tiny_model_dir, synth_dir, run_copy, tmp_path, capsys, stem):
    marker = tmp_path / "payload-ran"
    newest = run_copy / "checkpoints" / "step-000002"
    (newest / f"{stem}.safetensors").unlink()
    crafted = newest / f"{stem}.pt"
    torch.save({"state": _Payload(marker)}, crafted)
    _rewrite_marker(newest)
    assert ckpt.verify_checkpoint(newest) is True  # the manifest cannot tell: it was rewritten too
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(two_step_recipe(tiny_model_dir, synth_dir, run_copy).to_yaml())
    before = _snapshot(run_copy)
    assert main(["train", str(recipe), "--resume", "auto"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(crafted) in err and "not loaded" in err and "Traceback" not in err
    assert not marker.exists()
    assert _snapshot(run_copy) == before  # refused before anything was written
    # the control: the full unpickler, which the kit used to fall back to, does run it
    torch.load(crafted, weights_only=False)
    assert marker.exists()


def test_rng_files_of_earlier_versions_are_read_safely_or_refused(run_copy):
    import numpy as np

    newest = run_copy / "checkpoints" / "step-000002"
    (newest / "rng-rank0.safetensors").unlink()
    state = ckpt.rng_state()
    torch.save(state, newest / "rng-rank0.pt")  # the previous version: plain lists and a tensor
    read = read_rank_rng(newest, 0)
    assert read["python"] == state["python"] and torch.equal(read["torch"], state["torch"])
    old = dict(state, numpy=np.random.get_state())  # the first versions: a NumPy array, needs the full unpickler
    torch.save(old, newest / "rng-rank0.pt")
    with pytest.raises(ckpt.ResumeError) as err:
        read_rank_rng(newest, 0)
    assert "rng-rank0.pt cannot be read without running code" in str(err.value) and "\n" not in str(err.value)


def test_a_checkpoint_adapter_with_nan_is_refused_on_resume_in_one_line(tiny_model_dir, synth_dir, run_copy, tmp_path, capsys):
    """A diverged step's adapter (NaN) made every resumed step non-finite; resume names the tensor instead."""
    from safetensors.torch import save_file

    newest = run_copy / "checkpoints" / "step-000002"
    weights = load_file(str(newest / ADAPTER))
    name = sorted(weights)[3]
    weights[name][0, 0] = float("nan")
    save_file(weights, str(newest / ADAPTER))
    _rewrite_marker(newest)  # intact as far as the manifest can tell
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(two_step_recipe(tiny_model_dir, synth_dir, run_copy).to_yaml())
    before = _snapshot(run_copy)
    assert main(["train", str(recipe), "--resume", "auto"]) == 2
    err = capsys.readouterr().err
    (line,) = [line for line in err.splitlines() if "error:" in line]
    assert "1 NaN or infinite value(s)" in line and f"--resume {run_copy / 'checkpoints'}/step-N" in line
    assert "Traceback" not in err
    assert _snapshot(run_copy) == before


def test_sigterm_during_training_keeps_checkpoints_and_releases_the_lock(tiny_model_dir, synth_dir, tmp_path):
    """SIGTERM (Colab or a batch scheduler stopping the job) is handled like Ctrl-C: exit 143, the complete
    checkpoints stay, and the run folder's lock is released, so `--resume auto` can start at once."""
    import signal
    import time

    from echoink_lite.safe_output import RUN_LOCK_NAME

    out = tmp_path / "run"
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(tiny_recipe(tiny_model_dir, synth_dir, out, schedule__max_steps=500,
                                  checkpoint__save_every_steps=1).to_yaml())
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(pathlib.Path(__file__).parent), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.Popen([sys.executable, "-m", "echoink_lite.cli", "train", str(recipe)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while not ckpt.complete_checkpoints(out):
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.1)
    assert (out / RUN_LOCK_NAME).is_file()
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err[-2000:]
    assert "terminated (SIGTERM): complete checkpoints are kept; continue with --resume auto" in err
    assert "Traceback" not in err
    assert not (out / RUN_LOCK_NAME).exists()
    steps = [s for s, _ in ckpt.complete_checkpoints(out)]
    assert steps and resolve_resume("auto", out, warn=lambda m: None) == out / "checkpoints" / f"step-{steps[-1]:06d}"
