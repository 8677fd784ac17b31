"""What the kit writes for a flag: never over something it did not write, and always whole.

Every file or folder a command writes for the user (`data check --report`, `plan --json`, `merge --report`,
`eval --out` and its summary, `plot --out`, `export --out`, `merge --out`, `data synth OUT`, `tiny OUT`,
`demo --out`) follows two rules:

1. **Only over its own earlier output.** An existing file is replaced only when the same command wrote it
   for the same purpose, recognised from the file itself (its *kind*, below), so a rerun into its own
   output works (`eval --out` resumes its predictions, `data check --report` rewrites its report) and
   nothing else is ever overwritten: not a dataset file, not a training run's file, not a user's file. A
   refusal is one line naming the file and the fix; nothing is written before it.
2. **Whole or not at all.** A file is written to a temporary file in the same folder and renamed over the
   target (`os.replace`, atomic), so a failed write (a full disk, an interruption) leaves the old file as it
   was. A folder is written as a hidden sibling folder, then swapped in.

How a kind is recognised: a JSON output carries the key `"echoink_lite_output": KIND`; a JSON Lines output
(the reject report, eval predictions) by the keys of its lines (both can be empty: a clean split, a run
stopped before its first row); the curves PNG by its text chunk `echoink-lite: curves`; a folder by the file
`.echoink-lite-output.json` inside it, which names the kind and lists every file the command wrote there,
so a folder that has since gained a file of someone else's is refused.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

MARK_KEY = "echoink_lite_output"
FOLDER_MARKER = ".echoink-lite-output.json"
PNG_TEXT_KEY = "echoink-lite"
RUN_LOCK_NAME = "train.lock"
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_MAX_RECOGNISED_BYTES = 256 * 1024**2  # a larger file is not a report or summary of the kit's
_EMPTY_SUFFIXES = {".jsonl", ".json", ".ndjson", ".txt", ".log", ""}


class OutputError(ValueError):
    """An output the kit refuses to write (or could not write); one line naming the file and the fix."""


# ---------------------------------------------------------------------------------------------------
# Kinds of files, recognised from their content
# ---------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class FileKind:
    name: str                           # the command that writes it, as users type it
    recognise: Callable[[Path], bool]   # True when an existing file is this command's own output
    example: str                        # a file name to suggest
    empty_ok: bool = False              # its own output can be an empty file


def _read_small(path: Path) -> bytes | None:
    try:
        if path.stat().st_size > _MAX_RECOGNISED_BYTES:
            return None
        return path.read_bytes()
    except OSError:
        return None


def _json_object(path: Path) -> dict[str, Any] | None:
    data = _read_small(path)
    try:
        obj = json.loads(data) if data is not None else None
    except (ValueError, UnicodeDecodeError, RecursionError):
        return None
    return obj if isinstance(obj, dict) else None


def _marked_json(kind: str) -> Callable[[Path], bool]:
    return lambda path: (_json_object(path) or {}).get(MARK_KEY) == kind


def _jsonl_with_keys(keys: frozenset[str]) -> Callable[[Path], bool]:
    def recognise(path: Path) -> bool:
        data = _read_small(path)
        if data is None:
            return False
        lines = data.split(b"\n")
        for number, raw in enumerate(lines):
            if not raw.strip():
                continue
            try:
                record = json.loads(raw)
            except (ValueError, UnicodeDecodeError, RecursionError):
                if number == len(lines) - 1:  # a last line cut short by a crash: the kit repairs it on resume
                    continue
                return False
            if not isinstance(record, dict) or not keys <= record.keys():
                return False
        return True

    return recognise


def _png_text(path: Path) -> dict[str, str] | None:
    data = _read_small(path)
    if data is None or not data.startswith(_PNG_SIGNATURE):
        return None
    from io import BytesIO

    from PIL import Image

    try:
        with Image.open(BytesIO(data)) as image:
            return dict(getattr(image, "text", {}) or {})
    except Exception:  # noqa: BLE001 - an unreadable PNG is simply not the kit's
        return None


def _curves_png(path: Path) -> bool:
    text = _png_text(path)
    if text is None:
        return False
    if text.get(PNG_TEXT_KEY) == "curves":
        return True
    # written before the marker existed: matplotlib's PNG named curves.png in a run folder
    return (path.name == "curves.png" and (path.parent / "metrics.jsonl").is_file()
            and text.get("Software", "").startswith("Matplotlib"))


def _demo_summary(path: Path) -> bool:
    obj = _json_object(path)  # the demo's summaries before the marker hold these keys
    return obj is not None and (obj.get(MARK_KEY) == "demo summary" or {"accuracy_before", "grpo_steps", "quick"} <= obj.keys())


def _eval_summary(path: Path) -> bool:
    obj = _json_object(path)
    if obj is None:
        return False
    return obj.get(MARK_KEY) == "eval summary" or {"predictions_path", "results", "config"} <= obj.keys()


REJECT_REPORT = FileKind("data check --report", _jsonl_with_keys(frozenset({"problem_id", "reason", "detail", "index"})),
                         "bad_rows.jsonl", empty_ok=True)
PREDICTIONS = FileKind("eval --out", _jsonl_with_keys(frozenset({"label", "problem_id", "sample"})),
                       "predictions.jsonl", empty_ok=True)
EVAL_SUMMARY = FileKind("eval summary", _eval_summary, "predictions.summary.json")
PLAN_JSON = FileKind("plan --json", _marked_json("plan --json"), "plan.json")
MERGE_REPORT = FileKind("merge --report", _marked_json("merge --report"), "merge_report.json")
DEMO_SUMMARY = FileKind("demo summary", _demo_summary, "demo_summary.json")
CURVES_PNG = FileKind("plot --out", _curves_png, "curves.png")


# ---------------------------------------------------------------------------------------------------
# Files no output ever replaces, whatever they hold
# ---------------------------------------------------------------------------------------------------
_LIST_FILE = re.compile(r"^omni_rl_format_.+\.json$")
_RUN_FILES = {"metrics.jsonl", "recipe.yaml", RUN_LOCK_NAME}
_CHECKPOINT_FILES = {"COMPLETE", "state.json"}


def _is_run_folder(folder: Path) -> bool:
    return any((folder / name).exists() for name in ("recipe.yaml", "metrics.jsonl", "checkpoints", RUN_LOCK_NAME))


def protected_reason(path: Path) -> str | None:
    """Why `path` is a dataset or run file that no output may replace (existing or not), or None."""
    folder = path.parent
    if _LIST_FILE.match(path.name):
        return "a dataset's list file (the AVQA layout's omni_rl_format_<split>.json)"
    if folder.name in ("audios", "images") and any(folder.parent.glob("omni_rl_format_*.json")):
        return f"a dataset's media file (in the {folder.name}/ folder of the split {folder.parent})"
    if path.name in _RUN_FILES and _is_run_folder(folder):
        what = "the training log" if path.name == "metrics.jsonl" else "a file"
        return f"{what} of the training run in {folder}"
    if path.name in _CHECKPOINT_FILES and folder.parent.name == "checkpoints":
        return f"a file of the checkpoint {folder}"
    return None


# ---------------------------------------------------------------------------------------------------
# Files: check, then write through a temporary file and a rename
# ---------------------------------------------------------------------------------------------------
def _parent_problem(path: Path) -> str | None:
    ancestor = path.parent
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        return f"{ancestor} is a file, not a folder"
    if not os.access(ancestor, os.W_OK | os.X_OK):
        return f"the folder {ancestor} is not writable"
    return None


def check_output_file(path: str | Path, kind: FileKind, flag: str) -> Path:
    """`path` if `kind` may be written there: a new file, or this command's own earlier output. Otherwise
    OutputError, one line naming the file and the fix. Writes nothing."""
    path = Path(path).expanduser()
    fix = f"Fix: pass another path, e.g. {path.parent / kind.example}" if path.name else "Fix: pass a file path"
    if path.is_dir() and not path.is_symlink():
        raise OutputError(f"cannot write {flag} {path}: it is a folder; pass a file path, e.g. {path / kind.example}")
    reason = protected_reason(path)
    if reason:
        raise OutputError(f"{flag} {path} is {reason}; echoink-lite never writes over it. Fix: pass another path, "
                          f"outside the data and run folders, e.g. {kind.example}.")
    if path.is_symlink():
        raise OutputError(f"{flag} {path} is a symbolic link; it is not replaced. {fix}, or the file it points to.")
    if path.exists():
        if not path.is_file():
            raise OutputError(f"{flag} {path} exists and is not a regular file. {fix}.")
        empty = path.stat().st_size == 0
        if not ((empty and kind.empty_ok and path.suffix.lower() in _EMPTY_SUFFIXES) or (not empty and kind.recognise(path))):
            raise OutputError(f"{flag} {path} already exists and was not written by `echoink-lite {kind.name}`; it is not "
                              f"overwritten. {fix}, or move that file away first.")
        if not os.access(path.parent, os.W_OK | os.X_OK):
            raise OutputError(f"cannot write {flag} {path}: the folder {path.parent} is not writable. {fix}.")
        return path
    problem = _parent_problem(path)
    if problem:
        raise OutputError(f"cannot write {flag} {path}: {problem}. {fix} in a writable folder.")
    return path


def fsync_fd(fd: int) -> None:
    """fsync, ignoring only "not supported here" (e.g. folders on Windows); a real failure (a full disk, an I/O
    error) raises."""
    try:
        os.fsync(fd)
    except OSError as err:
        if err.errno not in (errno.EINVAL, errno.EBADF, errno.ENOTSUP):
            raise


def fsync_dir(folder: Path) -> None:
    """fsync a folder (so a rename in it is on the disk), where the platform can open folders."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return  # folders cannot be opened on every platform
    try:
        fsync_fd(fd)
    finally:
        os.close(fd)


def write_bytes_atomic(path: Path, data: bytes) -> None:
    """`data` to `path` via a temporary file in the same folder, fsynced, then renamed over `path` and the
    folder fsynced. The kit's one atomic file write (outputs, checkpoint files, a run's recipe.yaml)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:6]}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            fsync_fd(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def write_output(path: str | Path, data: bytes | str, kind: FileKind, flag: str) -> Path:
    """Check (`check_output_file`), then write atomically; a failed write is OutputError and leaves any
    earlier file unchanged."""
    path = check_output_file(path, kind, flag)
    try:
        write_bytes_atomic(path, data.encode("utf-8") if isinstance(data, str) else data)
    except OSError as err:
        raise OutputError(f"cannot write {flag} {path}: {err.strerror or err}; an earlier file there is unchanged. "
                          "Fix: free space or pass a path in a writable folder.") from None
    return path


def write_json_output(path: str | Path, obj: dict[str, Any], kind: FileKind, flag: str, **dumps: Any) -> Path:
    """A JSON object marked as `kind`'s output (so a rerun may replace it), written by `write_output`."""
    marked = {MARK_KEY: kind.name, **{k: v for k, v in obj.items() if k != MARK_KEY}}
    return write_output(path, json.dumps(marked, indent=2, **dumps) + "\n", kind, flag)


# ---------------------------------------------------------------------------------------------------
# Folders: a marker listing what the command wrote; written aside, then swapped in
# ---------------------------------------------------------------------------------------------------
def folder_marker(folder: Path) -> dict[str, Any] | None:
    obj = _json_object(folder / FOLDER_MARKER)
    if obj is None or not isinstance(obj.get("kind"), str) or not isinstance(obj.get("files"), list):
        return None
    return obj


def _files_under(folder: Path) -> list[str]:
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if not p.is_dir() or p.is_symlink())


def foreign_files(folder: Path, kind: str) -> list[str]:
    """Files in an existing `folder` that `kind` did not write (everything, when it holds no marker of `kind`)."""
    marker = folder_marker(folder)
    present = [f for f in _files_under(folder) if f != FOLDER_MARKER]
    if marker is None or marker["kind"] != kind:
        return present or ([FOLDER_MARKER] if (folder / FOLDER_MARKER).exists() else [])
    listed = set(marker["files"])
    return [f for f in present if f not in listed]


Foreign = Callable[[Path], list[str]]


def check_output_folder(path: str | Path, kind: str, flag: str, foreign: Foreign | None = None) -> Path:
    """`path` if `kind` may write the folder: new, empty, or its own earlier output with nothing added.
    Otherwise OutputError naming a file it did not write. Writes nothing. `foreign(folder)` lists the files
    `kind` did not write (default: those its marker file does not list)."""
    path = Path(path).expanduser()
    fix = "Fix: pass a new or empty folder"
    if path.is_symlink():
        raise OutputError(f"{flag} {path} is a symbolic link; it is not replaced. {fix}.")
    if path.exists() and not path.is_dir():
        raise OutputError(f"{flag} {path} is a file, not a folder. {fix}.")
    if path.is_dir():
        others = foreign(path) if foreign is not None else foreign_files(path, kind)
        others = sorted(others, key=lambda f: f.startswith("."))  # name a visible file first
        if others:
            more = f" and {len(others) - 1} more" if len(others) > 1 else ""
            raise OutputError(f"{flag} {path} holds {others[0]}{more}, which `echoink-lite {kind}` did not write; "
                              f"nothing there is overwritten. {fix}, or move those files away.")
        if not os.access(path.parent, os.W_OK | os.X_OK):
            raise OutputError(f"cannot write {flag} {path}: its parent folder {path.parent} is not writable. {fix}.")
        return path
    problem = _parent_problem(path)
    if problem:
        raise OutputError(f"cannot write {flag} {path}: {problem}. {fix} in a writable place.")
    return path


def new_partial_folder(path: Path, flag: str) -> Path:
    """A new, uniquely named hidden folder beside `path` (same file system, so the final rename is atomic).
    Used by every command that writes a folder (`replacing_folder`, merge, export)."""
    problem = _parent_problem(path)
    if problem:
        raise OutputError(f"cannot write {flag} {path}: {problem}. Fix: pass a folder you can write to.")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.parent / f".{path.name}.partial-{uuid.uuid4().hex[:8]}"
        tmp.mkdir()
    except OSError as err:
        raise OutputError(f"cannot write {flag} {path}: {err.strerror or err} ({err.filename or path.parent}). "
                          "Fix: pass a folder you can write to.") from None
    return tmp


def finish_folder(tmp: Path, path: Path, kind: str, mark: bool = True) -> None:
    """Mark `tmp` as `kind`'s output (listing its files; unless `mark` is false) and put it in place of `path`:
    an earlier output of the same kind (checked before `tmp` was written) is renamed aside first and deleted
    last, so a failure in between leaves it whole under a hidden name beside `path`."""
    if mark:
        marker = {"kind": kind, "files": [f for f in _files_under(tmp) if f != FOLDER_MARKER]}
        write_bytes_atomic(tmp / FOLDER_MARKER, (json.dumps(marker, indent=1) + "\n").encode("utf-8"))
    old = None
    if path.is_dir():
        if any(path.iterdir()):
            old = path.parent / f".{path.name}.old-{uuid.uuid4().hex[:8]}"
            path.rename(old)
        else:
            path.rmdir()
    tmp.rename(path)
    fsync_dir(path.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


@contextmanager
def replacing_folder(path: str | Path, kind: str, flag: str, foreign: Foreign | None = None,
                     mark: bool = True) -> Iterator[Path]:
    """Check `path` (`check_output_folder`), yield a hidden sibling folder to write into, and swap it in when
    the block ends without an error; on an error the sibling is removed and `path` is unchanged. A command
    that recognises its folders by their content passes `foreign` and `mark=False`."""
    path = check_output_folder(path, kind, flag, foreign)
    tmp = new_partial_folder(path, flag)
    try:
        yield tmp
        check_output_folder(path, kind, flag, foreign)  # nothing of someone else's appeared there meanwhile
        finish_folder(tmp, path, kind, mark)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
