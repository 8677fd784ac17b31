"""Who may write a run folder, and where it may be: one `train` at a time, never on its own data or model, never
mixed with an earlier run.

- **Where.** `checkpoint.output_dir` must not be, contain, or lie inside the training or validation split
  folder or the (local) model folder: `--overwrite` renames an earlier run aside, which there would move the
  data away and leave the run training on nothing. A fresh start never replaces a `recipe.yaml` or
  `curves.png` the kit did not write there (a recipe of the user's kept beside the run). Checked on every
  process before anything is written.
- **An earlier run.** Starting a run refuses a folder that holds an earlier run unless it resumes it or moves it
  aside (`--overwrite`): a fresh start there would truncate metrics.jsonl, and its new checkpoints would lose to
  the older, higher-numbered ones at pruning and at the next `--resume auto`. `check_run_dir` refuses (reads
  only, every process); `prepare_run_dir` makes the run's first writes once every check has passed.
- **Who.** `train` holds an exclusive lock, `RUN/train.lock`, created with O_CREAT | O_EXCL (atomic: of two
  runs starting together exactly one gets it) and holding the process id, the host and when it started. A
  second `train` into the folder is refused in one line naming the holder. Under torchrun or `accelerate
  launch` only rank 0 takes it. It is released (deleted) when `train` ends, by an exception or Ctrl-C too.
- **Stale locks.** A process killed outright leaves its lock behind. On the same host the lock is stale when
  its process no longer runs (or its pid now belongs to a later process); it is taken over with a warning
  naming it. A lock from another host (a Drive folder shared by two machines, a Colab runtime that was
  replaced) cannot be checked that way, so the holder touches the file every `HEARTBEAT_S` seconds and a lock
  untouched for `STALE_AFTER_S` seconds is stale too; a fresher one is refused, saying how to proceed.

The checkpoints inside the folder are `checkpoints`'s; choosing one to resume from is `resume`'s.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .checkpoints import CheckpointError, checkpoint_dir, complete_checkpoints, step_dirs
from .safe_output import CURVES_PNG, RUN_LOCK_NAME, write_bytes_atomic

HEARTBEAT_S = 60.0
STALE_AFTER_S = 600.0
RUN_RECIPE_HEADER = "# echoink-lite train: the recipe this run was started with (rewritten by the kit at each start)\n"

Note = Callable[[str], None]


class RunFolderError(CheckpointError):
    """A run folder that cannot be used as asked (an earlier run in it, not writable)."""


def _stderr(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr)


# ---------------------------------------------------------------------------------------------------
# Where a run folder may be
# ---------------------------------------------------------------------------------------------------
def _input_folders(recipe) -> list[tuple[str, str, Path]]:
    """(recipe key, what, folder) of the training and validation splits and of a local model folder."""
    found = []
    for key, what, value in (("data.train", "training split", recipe.data.train),
                             ("data.valid", "validation split", recipe.data.valid),
                             ("model.name_or_path", "model folder", recipe.model.name_or_path)):
        if not value:
            continue
        path = Path(value).expanduser()
        if key == "model.name_or_path" and not path.exists():
            continue  # a Hub id
        folder = path.parent if path.is_file() else path  # a split given as its JSON list file
        found.append((key, what, folder.resolve()))
    return found


def check_apart_from_inputs(recipe) -> None:
    """RunFolderError (one line) when checkpoint.output_dir is, contains or lies inside a split or the model."""
    out_text = recipe.checkpoint.output_dir
    out = Path(out_text).expanduser().resolve()
    for key, what, folder in _input_folders(recipe):
        if out == folder:
            relation = "is"
        elif out in folder.parents:
            relation = "contains"
        elif folder in out.parents:
            relation = "is inside"
        else:
            continue
        raise RunFolderError(
            f"checkpoint.output_dir {out_text} {relation} the {what} {folder} ({key}): the run would write its "
            "checkpoints there, and --overwrite would move that folder aside. Fix: choose a checkpoint.output_dir "
            f"outside it, e.g. {folder.parent / 'runs' / 'my-run'}."
        )


def kit_recipe_file(path: Path, recipe_text: str | None = None) -> bool:
    """True for a recipe.yaml written by `train` (its header), or one holding exactly `recipe_text`."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return False
    return text.startswith(RUN_RECIPE_HEADER) or (recipe_text is not None and text == recipe_text)


def check_own_run_files(run_dir: Path, recipe_text: str | None = None) -> None:
    """RunFolderError when the folder holds a recipe.yaml or curves.png the kit did not write, which a run would
    replace. Only for folders without an earlier run (`check_run_dir` handles those)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir() or earlier_run(run_dir):
        return
    recipe, curves = run_dir / "recipe.yaml", run_dir / "curves.png"
    for path, ours in ((recipe, lambda p: kit_recipe_file(p, recipe_text)), (curves, CURVES_PNG.recognise)):
        if path.exists() and not ours(path):
            raise RunFolderError(
                f"{path} was not written by echoink-lite train, and a run in {run_dir} would replace it. Fix: move "
                "that file away, or choose another checkpoint.output_dir."
            )


# ---------------------------------------------------------------------------------------------------
# An earlier run in the folder: refuse to start over it; move it aside only when asked
# ---------------------------------------------------------------------------------------------------
def earlier_run(run_dir: Path) -> list[str]:
    """What in `run_dir` shows that a run already made progress there (empty if nothing)."""
    run_dir = Path(run_dir)
    found = []
    metrics = run_dir / "metrics.jsonl"
    if metrics.is_file() and metrics.stat().st_size > 0:
        found.append("metrics.jsonl")
    steps = step_dirs(run_dir)
    if steps:
        found.append(f"checkpoints up to {steps[-1][1].name}")
    if (run_dir / "adapter").exists():
        found.append("adapter/")
    return found


def check_run_dir(run_dir: Path, resuming: bool, overwrite: bool) -> None:
    """Refuse (RunFolderError) a start that would mix with an earlier run. Reads only: call it on every process."""
    run_dir = Path(run_dir)
    if resuming and overwrite:
        raise RunFolderError("--overwrite starts a new run and --resume continues one: pass only one of them")
    if run_dir.exists() and not run_dir.is_dir():
        raise RunFolderError(f"checkpoint.output_dir {run_dir} is a file, not a folder: choose another checkpoint.output_dir")
    found = [] if resuming or overwrite else earlier_run(run_dir)
    if found:
        raise RunFolderError(
            f"{run_dir} holds an earlier run ({', '.join(found)}); starting over there would mix the two runs. "
            "Continue it with --resume auto, start elsewhere with checkpoint.output_dir=NEW_FOLDER, or pass "
            "--overwrite to move the earlier run aside (renamed, not deleted)."
        )


def _free_name(path: Path) -> Path:
    if not path.exists():
        return path
    n = 2
    while path.with_name(f"{path.name}-{n}").exists():
        n += 1
    return path.with_name(f"{path.name}-{n}")


def prepare_run_dir(run_dir: Path, resuming: bool, overwrite: bool, resume_step: int | None = None,
                    recipe_text: str | None = None, note: Note | None = None, lock=None) -> Path | None:
    """The run's first writes, once every check has passed (the main process only).

    With `overwrite`, an earlier run is renamed to `<run_dir>.old-<time>` (returned); the run's lock
    (`RunLock`, which was inside it) moves to the new folder. When resuming at
    `resume_step`, complete checkpoints of later steps (damaged ones skipped by the resume, or a timeline
    left by resuming an older checkpoint) are moved to `checkpoints/set-aside-<time>/`, so that pruning and a
    later `--resume auto` cannot prefer them. Then the folder is created and `recipe_text` saved as recipe.yaml.
    """
    note = note or _stderr
    run_dir = Path(run_dir)
    check_run_dir(run_dir, resuming, overwrite)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    moved = None
    writing = run_dir
    try:
        if overwrite and earlier_run(run_dir):
            absolute = run_dir.resolve()
            moved = writing = _free_name(absolute.with_name(f"{absolute.name}.old-{stamp}"))
            absolute.rename(moved)
            note(f"moved the earlier run in {run_dir} aside to {moved}")
        writing = run_dir
        run_dir.mkdir(parents=True, exist_ok=True)
        if moved is not None and lock is not None:
            lock.relocate(moved)
        newer = [p for s, p in complete_checkpoints(run_dir) if resume_step is not None and s > resume_step]
        if newer:
            writing = aside = _free_name(checkpoint_dir(run_dir) / f"set-aside-{stamp}")
            aside.mkdir()
            for p in newer:
                p.rename(aside / p.name)
            note(f"moved {len(newer)} checkpoint(s) newer than step {resume_step} ({', '.join(p.name for p in newer)}) "
                 f"aside to {aside}: this run continues from step {resume_step}")
        if recipe_text is not None:
            writing = run_dir / "recipe.yaml"
            write_bytes_atomic(writing, (RUN_RECIPE_HEADER + recipe_text).encode("utf-8"))
        else:  # make sure the folder takes files before anything runs
            writing = run_dir / f".write-test-{os.getpid()}"
            writing.write_bytes(b"")
            writing.unlink()
    except OSError as err:
        raise RunFolderError(
            f"cannot write {writing}: {err.strerror or err}. Choose a writable checkpoint.output_dir."
        ) from None
    return moved


# ---------------------------------------------------------------------------------------------------
# The lock
# ---------------------------------------------------------------------------------------------------
def _process_start(pid: int) -> str | None:
    """When process `pid` started (Linux: field 22 of /proc/PID/stat), to tell a reused pid apart."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[-1].split()[19]


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    except (OSError, ValueError, OverflowError):
        return False
    return True


def _read_lock(path: Path) -> dict[str, Any] | None:
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, UnicodeDecodeError):
        return None
    return info if isinstance(info, dict) else None


def _describe(info: dict[str, Any]) -> str:
    since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(info.get("started", 0)))
    return f"pid {info.get('pid')} on host {info.get('host')}, since {since}"


def stale_reason(info: dict[str, Any] | None, path: Path, now: float | None = None) -> str | None:
    """Why the lock in `path` (its content `info`) is stale, or None while its holder may still run."""
    now = time.time() if now is None else now
    try:
        age = now - path.stat().st_mtime
    except OSError:
        return "it is gone"
    if info is None or not isinstance(info.get("pid"), int):
        return None if age < 10 else "it is unreadable"  # a lock being written right now is not yet readable
    if info.get("host") == socket.gethostname():
        if not _pid_alive(info["pid"]):
            return "its process no longer runs"
        start = info.get("process_start")
        if start is not None and _process_start(info["pid"]) not in (None, start):
            return "its process ended and the pid now belongs to another process"
        return None
    if age > STALE_AFTER_S:
        return f"its holder on another host has not touched it for {age / 60:.0f} minutes"
    return None


class RunLock:
    """An acquired run folder lock; `release()` deletes it (only while it is still this process's)."""

    def __init__(self, path: Path, info: dict[str, Any], created_folder: bool):
        self.path, self.info, self.created_folder = path, info, created_folder
        self._stop = threading.Event()
        self._beat = threading.Thread(target=self._heartbeat, name="echoink-lite run lock", daemon=True)
        self._beat.start()

    def _heartbeat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            if self.held():
                try:
                    os.utime(self.path)
                except OSError:
                    pass

    def held(self) -> bool:
        return (_read_lock(self.path) or {}).get("token") == self.info["token"]

    def relocate(self, moved_to: Path) -> None:
        """The run folder (with this lock in it) was renamed to `moved_to` by --overwrite, and a new, empty folder
        made in its place: lock that one, then drop the lock inside the moved folder."""
        _create(self.path, self.info)  # RunFolderError if someone else locked the new folder first
        (moved_to / self.path.name).unlink(missing_ok=True)

    def release(self) -> None:
        self._stop.set()
        if self.held():
            self.path.unlink(missing_ok=True)
        if self.created_folder:
            try:
                self.path.parent.rmdir()  # only if nothing else was written: a start refused early leaves nothing
            except OSError:
                pass


def _create(path: Path, info: dict[str, Any]) -> None:
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        raise RunFolderError(f"{path.parent} was locked by another echoink-lite train while this one started: "
                             "choose another checkpoint.output_dir, or wait for that run to end") from None
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(json.dumps(info) + "\n")
        f.flush()
        os.fsync(f.fileno())


def acquire_run_lock(run_dir: Path, note: Note) -> RunLock:
    """Lock `run_dir` for this process (creating the folder), taking over a stale lock with a `note`; a live
    one is a RunFolderError naming its holder."""
    run_dir = Path(run_dir)
    path = run_dir / RUN_LOCK_NAME
    created = not run_dir.exists()
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise RunFolderError(f"cannot write {run_dir}: {err.strerror or err}. Choose a writable checkpoint.output_dir.") from None
    info = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time(),
            "process_start": _process_start(os.getpid()), "token": uuid.uuid4().hex, "command": "echoink-lite train"}
    for _ in range(3):
        try:
            _create(path, info)
            return RunLock(path, info, created)
        except RunFolderError:
            pass
        except OSError as err:
            raise RunFolderError(f"cannot write {path}: {err.strerror or err}. Choose a writable checkpoint.output_dir.") from None
        held = _read_lock(path)
        why = stale_reason(held, path)
        if why is None:
            holder = _describe(held) if held else "a process that is still writing the lock"
            raise RunFolderError(
                f"{run_dir} is in use by another echoink-lite train ({holder}; lock file {path}). Wait for it to "
                "end, or choose another checkpoint.output_dir; if that run no longer runs, delete the lock file."
            )
        _take_over(path, held, why, note)
    raise RunFolderError(f"could not lock {run_dir}: other processes keep taking {path}. Choose another checkpoint.output_dir.")


def _take_over(path: Path, held: dict[str, Any] | None, why: str, note: Note) -> None:
    """Move the stale lock aside (one rename: of two processes taking it over, one wins), check that it is the
    one judged stale, and delete it."""
    aside = path.with_name(f".{path.name}.stale-{os.getpid()}-{uuid.uuid4().hex[:6]}")
    try:
        os.rename(path, aside)
    except FileNotFoundError:
        return  # someone else moved it first; try to create ours again
    if _read_lock(aside) != held:  # a fresh lock replaced the stale one in between: put it back
        try:
            os.link(aside, path)
        except OSError:
            pass
        aside.unlink(missing_ok=True)
        return
    aside.unlink(missing_ok=True)
    who = _describe(held) if held else "an unreadable lock"
    note(f"took over the stale lock {path} ({who}): {why}")
