"""Resuming a run: which checkpoint, whether this recipe may continue it, and loading its state.

Why this module exists: `--resume` must continue a run exactly where it stopped, or refuse in one line
before anything is written. So the checkpoint is chosen with care (`resolve_resume`: `auto`, a checkpoint
folder or a run folder), and verified against its manifest (`checkpoints.verify_checkpoint`), because a
file can still be damaged after the marker was written (a cloud-synced folder such as Colab's Google Drive,
a disk error). A damaged checkpoint is skipped with a warning naming the file, and the newest intact one is
used. Markers written before the manifest existed (they hold only the step number) are still accepted after
a completeness check.

Then the checkpoint must fit the run (`check_resumable`: the same math fields of the recipe, the same
usable rows, the same process count), and its optimizer, scheduler and RNG files must be readable safely
(`check_state_files`: nothing is unpickled; a `.pt` of an older checkpoint goes through torch's weights-only
loader only). `resume_point` does all of that on every process; `load_training_state` then loads the
adapter, optimizer, scheduler and RNG states. Writing checkpoints is `checkpoints`'s.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from .checkpoints import (MARKER, DamagedCheckpointError, Note, ResumeError, checkpoint_dir, complete_checkpoints,
                          verify_checkpoint)
from .state_files import StateFileError, check_rng_state, check_state_file, read_state, set_rng_state, state_file

_NO_RESUME = (None, "", "no", "never")


def _stderr(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr)


# ---------------------------------------------------------------------------------------------------
# Resuming: which checkpoint, and may this recipe continue it
# ---------------------------------------------------------------------------------------------------
def resume_requested(resume: str | None) -> bool:
    return resume not in _NO_RESUME


def newest_intact_checkpoint(run_dir: Path, warn: Note | None = None) -> Path | None:
    """The newest complete checkpoint whose files verify; one warning per damaged newer one. None if the run
    has no complete checkpoint; ResumeError if it has some but none is intact."""
    warn = warn or _stderr
    damaged: list[tuple[Path, str]] = []
    for _, path in reversed(complete_checkpoints(run_dir)):
        try:
            verified = verify_checkpoint(path)
        except DamagedCheckpointError as err:
            damaged.append((path, str(err)))
            continue
        for bad, why in damaged:
            warn(f"checkpoint {bad.name} is damaged: {why}; resuming from the newest intact one, {path}")
        if not verified:
            warn(f"{path / MARKER} has no file checksums (written by an older echoink-lite): its files were checked "
                 "for completeness only")
        return path
    if damaged:
        raise ResumeError(
            f"no intact checkpoint in {checkpoint_dir(run_dir)}: " + "; ".join(why for _, why in damaged)
            + ". Start a new run: run without --resume and with checkpoint.output_dir=NEW_FOLDER, or with --overwrite "
            "to move this run aside."
        )
    return None


def resolve_resume(resume: str | None, run_dir: Path, warn: Note | None = None) -> Path | None:
    """`None`/"no" -> fresh run; "auto" -> newest intact checkpoint (or fresh if none); else a checkpoint or
    a run folder. Damaged checkpoints are skipped with a warning ("auto", a run folder) or refused (a path)."""
    if not resume_requested(resume):
        return None
    if resume == "auto":
        return newest_intact_checkpoint(run_dir, warn)
    p = Path(resume)
    if (p / MARKER).is_file():
        try:
            if not verify_checkpoint(p):
                (warn or _stderr)(f"{p / MARKER} has no file checksums (written by an older echoink-lite): its files "
                                  "were checked for completeness only")
        except DamagedCheckpointError as err:
            raise ResumeError(f"cannot resume {p}: {err}. Use --resume auto to take the newest intact checkpoint.") from None
        return p
    if p.is_dir() and complete_checkpoints(p):  # a run folder was given
        return newest_intact_checkpoint(p, warn)
    raise ResumeError(f"--resume {resume}: no complete checkpoint there (a folder with a {MARKER} file, or a run folder)")


def load_state(ckpt: Path) -> dict[str, Any]:
    if not (ckpt / MARKER).is_file():
        raise ResumeError(f"{ckpt} has no {MARKER} marker: the save was interrupted. Use --resume auto or an older checkpoint.")
    path = ckpt / "state.json"
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise DamagedCheckpointError(
            f"{path} is unreadable ({err}); use --resume auto to take the newest intact checkpoint"
        ) from None
    if not isinstance(state, dict) or "step" not in state:
        raise DamagedCheckpointError(f"{path} holds no step; use --resume auto to take the newest intact checkpoint")
    return state


def check_resumable(state: dict[str, Any], ckpt: Path, recipe, data_fingerprint: str, world_size: int) -> None:
    """Refuse (ResumeError) to continue a checkpoint with a recipe, data or process count that changes the math.
    Call it before writing anything, on every process."""
    from .recipe import changed_math_fields

    changed = changed_math_fields(state.get("recipe_math", {}), recipe)
    if changed:
        raise ResumeError(
            f"cannot resume {ckpt}: the recipe changed in fields that change the math ({'; '.join(changed)}). "
            "Restore those values, or start a new run with another checkpoint.output_dir."
        )
    if state.get("data_fingerprint") != data_fingerprint:
        raise ResumeError(
            f"cannot resume {ckpt}: the usable training rows differ from the checkpoint's (different file, edits, "
            "or different rows rejected). Point data.train at the same data."
        )
    saved_world = state.get("world_size", 1)
    if saved_world != world_size:
        raise ResumeError(
            f"cannot resume {ckpt}: it was written by {saved_world} process(es) and this run has {world_size}; "
            f"resume with {saved_world} (the data split and RNG states are per process)."
        )


_UNREADABLE_FIX = ("Resume from a checkpoint written by this echoink-lite, or start a new run with "
                   "checkpoint.output_dir=NEW_FOLDER (or --overwrite to move this run aside).")


def read_rank_rng(ckpt: Path, rank: int) -> dict[str, Any]:
    """This process's RNG states from a checkpoint, checked against the generators; nothing is applied."""
    path = state_file(ckpt, f"rng-rank{rank}")
    if not path.is_file():
        raise ResumeError(
            f"{path} is missing: the checkpoint was written by fewer processes; resume with the same number of processes"
        )
    try:
        return check_rng_state(read_state(ckpt, f"rng-rank{rank}"), path)
    except StateFileError as err:
        raise ResumeError(f"cannot resume {ckpt}: {err}. {_UNREADABLE_FIX}") from None


def load_rank_rng(ckpt: Path, rank: int) -> None:
    set_rng_state(read_rank_rng(ckpt, rank))


def check_state_files(ckpt: Path, rank: int) -> None:
    """Refuse (ResumeError, one line) a checkpoint whose optimizer, scheduler or RNG file cannot be read safely,
    or whose adapter holds NaN or inf, before the run writes anything. Nothing is unpickled; a `.pt` goes
    through the weights-only loader only."""
    from .adapters import AdapterError, check_adapter_finite

    for stem in ("optimizer", "scheduler"):
        try:
            check_state_file(ckpt, stem)
        except StateFileError as err:
            raise ResumeError(f"cannot resume {ckpt}: {err}. {_UNREADABLE_FIX}") from None
    read_rank_rng(ckpt, rank)
    try:  # a NaN adapter would make every resumed step non-finite (the kit never saves one: such steps are skipped)
        check_adapter_finite(ckpt / "adapter", fix=f"resume from an earlier checkpoint (--resume {ckpt.parent}/step-N), "
                             "or start a new run with a lower optim.learning_rate")
    except AdapterError as err:
        raise ResumeError(str(err)) from None


# ---------------------------------------------------------------------------------------------------
# Resuming as `grpo.train` does it: the resume point, then the training state
# ---------------------------------------------------------------------------------------------------
def resume_point(run_dir: Path, resume: str | None, recipe, data_fingerprint: str, world_size: int,
                 warn: Note | None = None, rank: int = 0) -> tuple[Path | None, dict[str, Any]]:
    """(checkpoint to resume from, its state), or (None, {}) for a fresh run. Refuses a changed recipe, other
    data or another process count (`check_resumable`), and state files that cannot be read safely
    (`check_state_files`); damaged checkpoints are skipped with a warning."""
    path = resolve_resume(resume, run_dir, warn=warn)
    if path is None:
        return None, {}
    state = load_state(path)
    check_resumable(state, path, recipe, data_fingerprint, world_size)
    check_state_files(path, rank)
    return path, state


def load_training_state(path: Path, model, optimizer, scheduler, device, rank: int) -> None:
    """Adapter weights, optimizer, scheduler and this process's RNG states from a verified checkpoint."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    from .adapters import check_adapter_fits

    check_adapter_fits(model, path / "adapter", fix="resume with the recipe and base model that wrote this checkpoint, "
                       "or start a new run in another checkpoint.output_dir")
    weights = load_file(str(path / "adapter" / "adapter_model.safetensors"), device=str(device))
    result = set_peft_model_state_dict(model, weights)
    if getattr(result, "unexpected_keys", None):
        raise ResumeError(f"{path}: the adapter has keys this model lacks ({result.unexpected_keys[:3]}); "
                          "it was written for another base or LoRA setting. Resume with the same recipe.")
    try:
        optimizer.load_state_dict(read_state(path, "optimizer", device))
        scheduler.load_state_dict(read_state(path, "scheduler"))
    except StateFileError as err:
        raise ResumeError(f"cannot resume {path}: {err}. {_UNREADABLE_FIX}") from None
    load_rank_rng(path, rank)
