"""Checkpoints that truly resume: atomic writes, discovery of the newest complete one, recipe checks.

A checkpoint folder `checkpoints/step-000040/` holds:
  adapter/            the LoRA adapter in standard PEFT format (loadable with PeftModel.from_pretrained)
  optimizer.pt        AdamW state          scheduler.pt   learning-rate scheduler state
  rng-rank{R}.pt      python / numpy / torch (and CUDA) RNG states of each process
  state.json          step, total steps, the data order, the recipe's math fields and hash, counters
  COMPLETE            written last: a folder without it is ignored (a save interrupted midway)

Writes go to a hidden temporary folder that is renamed into place, then the marker is written and
synced, then older checkpoints beyond `keep_last` are deleted. So an interruption at any point leaves the
previous complete checkpoint untouched: a run loses at most the steps since it.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

MARKER = "COMPLETE"
_STEP_RE = re.compile(r"^step-(\d+)$")


class ResumeError(RuntimeError):
    """A checkpoint that cannot be resumed; the message says why and what to do."""


def checkpoint_dir(run_dir: Path) -> Path:
    return Path(run_dir) / "checkpoints"


def complete_checkpoints(run_dir: Path) -> list[tuple[int, Path]]:
    """(step, path) of complete checkpoints, oldest first; incomplete ones are ignored."""
    root = checkpoint_dir(run_dir)
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        m = _STEP_RE.match(p.name)
        if m and p.is_dir() and (p / MARKER).is_file():
            found.append((int(m.group(1)), p))
    return sorted(found)


def latest_checkpoint(run_dir: Path) -> Path | None:
    found = complete_checkpoints(run_dir)
    return found[-1][1] if found else None


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass


def tmp_path_for(run_dir: Path, step: int) -> Path:
    return checkpoint_dir(run_dir) / f".tmp-step-{step:06d}"


def begin_save(run_dir: Path, step: int) -> Path:
    """Create (fresh) the temporary folder for this step's checkpoint (rank 0 only)."""
    tmp = tmp_path_for(run_dir, step)
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    return tmp


def save_rank_rng(tmp: Path, rank: int) -> None:
    torch.save(rng_state(), tmp / f"rng-rank{rank}.pt")


def finish_save(run_dir: Path, tmp: Path, step: int, model, optimizer, scheduler, state: dict[str, Any], keep_last: int) -> Path:
    """Write the rank-0 parts, rename into place, write the marker, prune old checkpoints."""
    model.save_pretrained(tmp / "adapter", safe_serialization=True)
    torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
    torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
    state = dict(state, step=step, saved_at=time.time())
    (tmp / "state.json").write_text(json.dumps(state, indent=1))
    final = checkpoint_dir(run_dir) / f"step-{step:06d}"
    if final.exists():  # a leftover without marker from an interrupted save of the same step
        shutil.rmtree(final)
    os.replace(tmp, final)
    _fsync_dir(final.parent)
    with open(final / MARKER, "w") as f:
        f.write(f"{step}\n")
        f.flush()
        os.fsync(f.fileno())
    for _, old in complete_checkpoints(run_dir)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def load_state(ckpt: Path) -> dict[str, Any]:
    if not (ckpt / MARKER).is_file():
        raise ResumeError(f"{ckpt} has no {MARKER} marker: the save was interrupted. Use --resume auto or an older checkpoint.")
    return json.loads((ckpt / "state.json").read_text())


def load_rank_rng(ckpt: Path, rank: int) -> None:
    path = ckpt / f"rng-rank{rank}.pt"
    if not path.is_file():
        raise ResumeError(f"{path} is missing: the checkpoint was written by fewer processes; resume with the same number of processes")
    set_rng_state(torch.load(path, weights_only=False))


def resolve_resume(resume: str | None, run_dir: Path) -> Path | None:
    """`None`/"no" -> fresh run; "auto" -> newest complete checkpoint (or fresh if none); else a path."""
    if resume in (None, "", "no", "never"):
        return None
    if resume == "auto":
        return latest_checkpoint(run_dir)
    p = Path(resume)
    if (p / MARKER).is_file():
        return p
    if p.is_dir() and complete_checkpoints(p):  # a run folder was given
        return latest_checkpoint(p)
    raise ResumeError(f"--resume {resume}: no complete checkpoint there (a folder with a {MARKER} file, or a run folder)")
