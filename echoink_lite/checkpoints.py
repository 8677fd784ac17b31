"""Checkpoints that truly resume: atomic writes with a manifest, and their verification.

A run folder (`checkpoint.output_dir`) holds recipe.yaml, metrics.jsonl, checkpoints/, adapter/ and curves.png.
A checkpoint folder `checkpoints/step-000040/` holds:
  adapter/            the LoRA adapter in standard PEFT format (loadable with PeftModel.from_pretrained)
  optimizer.safetensors   AdamW state     scheduler.safetensors   learning-rate scheduler state
  rng-rank{R}.safetensors python / numpy / torch (and CUDA) RNG states of each process
  state.json          step, total steps, the data order, the recipe's math fields and hash, counters
  COMPLETE            the marker: a JSON manifest with the size and SHA-256 of every other file

Saving writes a hidden temporary folder, fsyncs every file, computes the manifest, writes the marker last
(itself via a temporary file and a rename), fsyncs the folders and renames the folder into place. Only then
are checkpoints beyond `keep_last` deleted. An interruption at any point leaves the previous checkpoint
untouched, and a folder without a marker is ignored. A full disk stops the run with one line naming the file
and the intact previous checkpoint.

`verify_checkpoint` checks a checkpoint against its manifest (sizes, then SHA-256), because a file can still
be damaged after the marker was written (a cloud-synced folder such as Colab's Google Drive, a disk error).
Markers written before the manifest existed (they hold only the step number) get a completeness check.

Nothing in a checkpoint is unpickled: the training state is stored as tensors and plain values
(`state_files`), and the `.pt` files of older checkpoints are read with torch's weights-only loader only.

Choosing and loading a checkpoint to resume from is `resume`'s; the run folder around the checkpoints (an
earlier run in it, the lock) is `run_folder`'s.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import shutil
import time
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from .safe_output import fsync_dir, fsync_fd, write_bytes_atomic
from .state_files import LEGACY_SUFFIX, rng_state, save_tree, state_file

MARKER = "COMPLETE"
MANIFEST_FORMAT = 1
_STEP_RE = re.compile(r"^step-(\d+)$")

Note = Callable[[str], None]


class CheckpointError(RuntimeError):
    """A run folder or checkpoint problem; the message says which path and what to do."""


class ResumeError(CheckpointError):
    """A checkpoint that cannot be resumed."""


class DamagedCheckpointError(ResumeError):
    """A complete checkpoint whose files no longer match its marker; the message names the file."""


class SaveError(CheckpointError):
    """A checkpoint that could not be written (disk full, permissions); the previous one is kept."""


def checkpoint_dir(run_dir: Path) -> Path:
    return Path(run_dir) / "checkpoints"


def step_dirs(run_dir: Path) -> list[tuple[int, Path]]:
    """(step, path) of every `step-N` folder, complete or not, oldest first."""
    root = checkpoint_dir(run_dir)
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        m = _STEP_RE.match(p.name)
        if m and p.is_dir():
            found.append((int(m.group(1)), p))
    return sorted(found)


def complete_checkpoints(run_dir: Path) -> list[tuple[int, Path]]:
    """(step, path) of checkpoints with a marker, oldest first; interrupted saves are ignored."""
    return [(s, p) for s, p in step_dirs(run_dir) if (p / MARKER).is_file()]


def latest_checkpoint(run_dir: Path) -> Path | None:
    found = complete_checkpoints(run_dir)
    return found[-1][1] if found else None


# ---------------------------------------------------------------------------------------------------
# Writing: fsync, manifest, and one-line errors for a full disk or an unwritable folder
# ---------------------------------------------------------------------------------------------------
def _no_space(err: BaseException) -> bool:
    """The error, or one it was raised from, is a full disk (or quota)."""
    seen: BaseException | None = err
    for _ in range(8):  # the chain of causes, a few links deep
        if seen is None:
            break
        if isinstance(seen, OSError) and seen.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        text = str(seen)  # safetensors: "I/O error: No space left on device (os error 28)"
        if os.strerror(errno.ENOSPC) in text or f"os error {errno.ENOSPC})" in text:
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def _is_write_failure(err: BaseException) -> bool:
    from safetensors import SafetensorError

    return isinstance(err, OSError) or _no_space(err) or (isinstance(err, SafetensorError) and "I/O error" in str(err))


def write_failure_message(err: BaseException, path: Path, previous: Path | None) -> str:
    """One line for a failed write of `path`, naming the checkpoint that a resume would use."""
    if _no_space(err):
        what = "no space left on device"
    else:
        what = f"cannot write ({getattr(err, 'strerror', None) or str(err).splitlines()[0]})"
    kept = f"the previous checkpoint {previous} is intact" if previous else "no earlier checkpoint of this run exists"
    return (f"{what} while writing {path}; {kept}. Free space (or choose a writable checkpoint.output_dir), "
            "then continue with --resume auto.")


def file_digest(path: Path, fsync: bool = False) -> dict[str, Any]:
    """{"size", "sha256"} of a file; with `fsync`, its data is flushed to the disk too."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
        if fsync:
            fsync_fd(f.fileno())
    return {"size": path.stat().st_size, "sha256": h.hexdigest()}


def build_manifest(folder: Path, fsync: bool = True) -> dict[str, dict[str, Any]]:
    """Size and SHA-256 of every file under `folder` (relative POSIX paths), fsyncing files and folders."""
    files = {}
    for path in sorted(folder.rglob("*")):
        if path.is_file() and path.name != MARKER:
            files[path.relative_to(folder).as_posix()] = file_digest(path, fsync=fsync)
    if fsync:
        for sub in sorted({p.parent for p in folder.rglob("*")} | {folder}, key=lambda p: len(p.parts), reverse=True):
            fsync_dir(sub)
    return files


def tmp_path_for(run_dir: Path, step: int) -> Path:
    return checkpoint_dir(run_dir) / f".tmp-step-{step:06d}"


def _previous(run_dir: Path, step: int) -> Path | None:
    older = [p for s, p in complete_checkpoints(run_dir) if s < step]
    return older[-1] if older else None


def begin_save(run_dir: Path, step: int) -> Path:
    """Create (fresh) the temporary folder for this step's checkpoint (rank 0 only)."""
    tmp = tmp_path_for(run_dir, step)
    try:
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
    except OSError as err:
        raise SaveError(write_failure_message(err, tmp, _previous(run_dir, step))) from None
    return tmp


def save_rank_rng(tmp: Path, rank: int) -> None:
    path = tmp / f"rng-rank{rank}.safetensors"
    try:
        save_tree(rng_state(), path)
    except Exception as err:
        if not _is_write_failure(err):
            raise
        run_dir = tmp.parent.parent
        raise SaveError(write_failure_message(err, path, _previous(run_dir, int(tmp.name.rsplit("-", 1)[1])))) from None


def finish_save(run_dir: Path, tmp: Path, step: int, model, optimizer, scheduler, state: dict[str, Any], keep_last: int) -> Path:
    """Write the rank-0 parts and the marker, rename into place, prune old checkpoints (rank 0 only)."""
    final = checkpoint_dir(run_dir) / f"step-{step:06d}"
    previous = _previous(run_dir, step)
    writing = tmp / "adapter"
    try:
        model.save_pretrained(writing, safe_serialization=True)
        writing = tmp / "optimizer.safetensors"
        save_tree(optimizer.state_dict(), writing)
        writing = tmp / "scheduler.safetensors"
        save_tree(scheduler.state_dict(), writing)
        writing = tmp / "state.json"
        write_bytes_atomic(writing, json.dumps(dict(state, step=step, saved_at=time.time()), indent=1).encode())
        writing = tmp
        files = build_manifest(tmp, fsync=True)
        writing = tmp / MARKER
        manifest = {"format": MANIFEST_FORMAT, "step": step, "files": files}
        write_bytes_atomic(writing, json.dumps(manifest, indent=1).encode())
        writing = final
        if final.exists():  # a leftover without marker from an interrupted save of the same step
            shutil.rmtree(final)
        os.replace(tmp, final)
        fsync_dir(final.parent)
    except Exception as err:
        if not _is_write_failure(err):
            raise
        shutil.rmtree(tmp, ignore_errors=True)  # give the space back
        raise SaveError(write_failure_message(err, writing, previous)) from None
    older = [p for s, p in complete_checkpoints(run_dir) if s < step]
    for old in older[: max(0, len(older) - (keep_last - 1))]:
        shutil.rmtree(old, ignore_errors=True)
    return final


# ---------------------------------------------------------------------------------------------------
# Verifying: the manifest, or a completeness check for markers written before it existed
# ---------------------------------------------------------------------------------------------------
def read_marker(ckpt: Path) -> dict[str, Any] | None:
    """The marker's manifest, or None for an older marker that holds only the step number."""
    path = Path(ckpt) / MARKER
    try:
        content = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise DamagedCheckpointError(f"{path} is unreadable (not a manifest, not a step number)") from None
    if isinstance(content, int):
        return None
    files = content.get("files") if isinstance(content, dict) else None
    if not isinstance(files, dict) or not all(
        isinstance(v, dict) and isinstance(v.get("size"), int) and isinstance(v.get("sha256"), str) for v in files.values()
    ):
        raise DamagedCheckpointError(f"{path} is unreadable (not a manifest, not a step number)")
    return content


def _check_safetensors_complete(path: Path) -> None:
    """The header parses and the file is as long as the header's tensors say (no checksums in the format)."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        n = int.from_bytes(head, "little") if len(head) == 8 else -1
        if n < 2 or 8 + n > size:
            raise DamagedCheckpointError(f"{path} is truncated ({size} bytes: its header is incomplete)")
        try:
            header = json.loads(f.read(n))
            end = max((int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"), default=0)
        except (ValueError, UnicodeDecodeError, KeyError, TypeError, IndexError, AttributeError):
            raise DamagedCheckpointError(f"{path} has an unreadable header") from None
    if 8 + n + end != size:
        raise DamagedCheckpointError(f"{path} has {size} bytes; its header describes {8 + n + end}")


def _check_complete_without_manifest(ckpt: Path) -> None:
    state = ckpt / "state.json"
    try:
        if not isinstance(json.loads(state.read_text(encoding="utf-8")), dict):
            raise ValueError
    except FileNotFoundError:
        raise DamagedCheckpointError(f"{state} is missing") from None
    except (ValueError, UnicodeDecodeError):
        raise DamagedCheckpointError(f"{state} is not a JSON object (empty or cut short)") from None
    adapter = ckpt / "adapter" / "adapter_model.safetensors"
    if not adapter.is_file():
        raise DamagedCheckpointError(f"{adapter} is missing")
    _check_safetensors_complete(adapter)
    rng_files = sorted(p.name for p in ckpt.glob("rng-rank*") if p.suffix in (".safetensors", LEGACY_SUFFIX))
    for name in [state_file(ckpt, "optimizer").name, state_file(ckpt, "scheduler").name, *rng_files]:
        path = ckpt / name
        if not path.is_file():
            raise DamagedCheckpointError(f"{path} is missing")
        if path.suffix != LEGACY_SUFFIX:
            _check_safetensors_complete(path)
            continue
        try:
            with zipfile.ZipFile(path) as z:  # torch files are zip archives with a CRC per entry
                bad = z.testzip()
        except zipfile.BadZipFile:
            raise DamagedCheckpointError(f"{path} is truncated or not a torch file") from None
        if bad is not None:
            raise DamagedCheckpointError(f"{path} is damaged (entry {bad} fails its CRC check)")


def verify_checkpoint(ckpt: Path) -> bool:
    """Raise DamagedCheckpointError naming the first bad file. True if checked against the marker's manifest,
    False for an older marker without one (then only completeness is checked)."""
    ckpt = Path(ckpt)
    manifest = read_marker(ckpt)
    if manifest is None:
        _check_complete_without_manifest(ckpt)
        return False
    files = manifest["files"]
    for rel, want in files.items():  # sizes first: cheap, and the usual damage (a truncated sync)
        path = ckpt / rel
        if not path.is_file():
            raise DamagedCheckpointError(f"{path} is missing")
        size = path.stat().st_size
        if size != want["size"]:
            raise DamagedCheckpointError(f"{path} has {size} bytes; its marker recorded {want['size']}")
    for rel, want in files.items():
        if file_digest(ckpt / rel)["sha256"] != want["sha256"]:
            raise DamagedCheckpointError(f"{ckpt / rel} does not match the SHA-256 its marker recorded (changed after the save)")
    return True


class Saver:
    """Saves the training state every `save_every_steps`, every `save_every_minutes` (all processes agree)
    and at the last step. `state_fn()` returns what state.json records besides the step.

    Rank 0 writes the shared files; a failure there (a full disk) is agreed on by every process and raised
    on all of them, so none is left waiting at a barrier."""

    def __init__(self, run_dir: Path, dst, model, optimizer, scheduler, checkpoint_cfg, total_steps: int,
                 start_step: int, state_fn: Callable[[], dict[str, Any]]):
        self.run_dir, self.dst, self.cfg, self.total_steps = Path(run_dir), dst, checkpoint_cfg, total_steps
        self.model, self.optimizer, self.scheduler, self.state_fn = model, optimizer, scheduler, state_fn
        self.last_time, self.last_step = time.time(), start_step

    def _together(self, fn: Callable[[], Any], on_main_only: bool) -> None:
        error: CheckpointError | None = None
        if self.dst.main or not on_main_only:
            try:
                fn()
            except CheckpointError as err:
                error = err
        if not self.dst.all_ok(error is None):
            raise error or SaveError(f"saving the checkpoint in {self.run_dir} failed on another process; "
                                     "its message says why. The previous checkpoint is intact.")

    def save(self, step: int) -> None:
        tmp = tmp_path_for(self.run_dir, step)
        self._together(lambda: begin_save(self.run_dir, step), on_main_only=True)
        self._together(lambda: save_rank_rng(tmp, self.dst.rank), on_main_only=False)
        state = dict(self.state_fn(), total_steps=self.total_steps, world_size=self.dst.world)
        self._together(lambda: finish_save(self.run_dir, tmp, step, self.model, self.optimizer, self.scheduler, state,
                                           self.cfg.keep_last), on_main_only=True)
        self.last_time, self.last_step = time.time(), step

    def save_if_new(self, step: int) -> None:
        if step > self.last_step:
            self.save(step)

    def maybe_save(self, step: int) -> None:
        due_time = (time.time() - self.last_time) / 60 >= self.cfg.save_every_minutes
        due_time = bool(self.dst.sum_(torch.tensor([float(due_time)])).item() > 0)  # all processes agree
        if step % self.cfg.save_every_steps == 0 or due_time or step == self.total_steps:
            self.save(step)
