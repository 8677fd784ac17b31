"""Pickle-free files for the training state in a checkpoint: optimizer, scheduler and RNG states.

Why: a checkpoint folder is often not the user's own (a shared Drive folder, a downloaded run), and a pickle
runs whatever code its author put in it when it is loaded. So every part of the training state is written as
safetensors: the tensors as tensors, and everything else (numbers, strings, the nesting of dicts, lists and
tuples) as JSON in the file's metadata. Reading one back parses JSON and tensor bytes only; nothing in the
file can name a function to call.

Layout of `optimizer.safetensors`, `scheduler.safetensors` and `rng-rank{R}.safetensors`: the metadata key
`echoink-lite-state` holds the tree as JSON, where a dict is `{"d": [[key, value], ...]}` (its keys may be
ints, as in an optimizer's state), a tuple `{"t": [...]}`, a tensor `{"T": "t0"}` (the tensor's name in the
file), and lists, numbers, strings, booleans and null are themselves.

Checkpoints written before this format hold `.pt` files. Those are read with `torch.load(weights_only=True)`
only, torch's loader that builds tensors and plain containers and refuses anything else; a file it refuses
is refused in one line, never retried with the full unpickler.
"""

from __future__ import annotations

import json
import pickle
import random
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

STATE_KEY = "echoink-lite-state"
STATE_FORMAT = "1"
SUFFIX = ".safetensors"
LEGACY_SUFFIX = ".pt"


class StateFileError(ValueError):
    """A state file that cannot be read safely or does not hold what the kit writes; the message names it."""


# ---------------------------------------------------------------------------------------------------
# A tree of dicts, lists, tuples, plain values and tensors <-> one safetensors file
# ---------------------------------------------------------------------------------------------------
def _encode(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, torch.Tensor):
        name = f"t{len(tensors)}"
        tensors[name] = obj.detach().contiguous()
        return {"T": name}
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    if isinstance(obj, list):
        return [_encode(v, tensors) for v in obj]
    if isinstance(obj, tuple):
        return {"t": [_encode(v, tensors) for v in obj]}
    if isinstance(obj, dict):
        return {"d": [[_encode(k, tensors), _encode(v, tensors)] for k, v in obj.items()]}
    raise TypeError(f"a training state holds a {type(obj).__name__}, which the checkpoint format cannot store")


def _decode(node: Any, tensors: dict[str, torch.Tensor], where: Path) -> Any:
    if node is None or isinstance(node, (bool, int, float, str)):
        return node
    if isinstance(node, list):
        return [_decode(v, tensors, where) for v in node]
    if isinstance(node, dict) and len(node) == 1:
        (tag, value), = node.items()
        if tag == "T" and isinstance(value, str) and value in tensors:
            return tensors[value]
        if tag == "t" and isinstance(value, list):
            return tuple(_decode(v, tensors, where) for v in value)
        if tag == "d" and isinstance(value, list) and all(isinstance(p, list) and len(p) == 2 for p in value):
            out = {}
            for k, v in value:
                key = _decode(k, tensors, where)
                if isinstance(key, (list, dict, torch.Tensor)):
                    raise StateFileError(f"{where} has an unusable dict key in its state")
                out[key] = _decode(v, tensors, where)
            return out
    raise StateFileError(f"{where} holds a state entry echoink-lite does not write ({json.dumps(node)[:60]})")


def save_tree(obj: Any, path: Path) -> None:
    """Write `obj` to `path` (safetensors; it writes a temporary file and renames it). A failed write raises
    OSError or safetensors' SafetensorError, as the checkpoint writer expects."""
    from safetensors.torch import save_file

    tensors: dict[str, torch.Tensor] = {}
    tree = _encode(obj, tensors)
    save_file(tensors, str(path), metadata={STATE_KEY: json.dumps(tree), "format": STATE_FORMAT})


def _read_header(path: Path) -> tuple[Any, list[str]]:
    """(the JSON tree, the tensor names) of a state file, from its header alone."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta, names = f.metadata() or {}, list(f.keys())
    except (SafetensorError, OSError, ValueError) as err:
        raise StateFileError(f"{path} is not a readable safetensors file ({str(err).splitlines()[0]})") from None
    if STATE_KEY not in meta:
        raise StateFileError(f"{path} holds no {STATE_KEY} entry: it was not written by echoink-lite")
    try:
        return json.loads(meta[STATE_KEY]), names
    except json.JSONDecodeError as err:
        raise StateFileError(f"{path}: its {STATE_KEY} entry is not JSON ({err.msg})") from None


def load_tree(path: Path, device: str | torch.device = "cpu") -> Any:
    """The tree `save_tree` wrote; StateFileError (one line, naming the file) for anything else."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    tree, _ = _read_header(path)
    try:
        tensors = load_file(str(path), device=str(device))
    except (SafetensorError, OSError, ValueError) as err:
        raise StateFileError(f"{path} is not a readable safetensors file ({str(err).splitlines()[0]})") from None
    return _decode(tree, tensors, path)


def load_legacy_pt(path: Path, device: str | torch.device = "cpu") -> Any:
    """A `.pt` state file of an older checkpoint, through torch's weights-only loader and nothing else."""
    try:
        return torch.load(path, map_location=device, weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, ValueError, EOFError, zipfile.BadZipFile, AttributeError,
            TypeError) as err:
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise StateFileError(
            f"{path} cannot be read without running code stored in it, so it is not loaded (torch's weights-only "
            f"loader refused it: {reason[:160]}). It was written by an early echoink-lite or altered since"
        ) from None


def state_file(folder: Path, stem: str) -> Path:
    """`folder/stem.safetensors`, or the `.pt` of a checkpoint written before it (if only that exists)."""
    new = folder / f"{stem}{SUFFIX}"
    legacy = folder / f"{stem}{LEGACY_SUFFIX}"
    return legacy if legacy.is_file() and not new.is_file() else new


def check_state_file(folder: Path, stem: str) -> None:
    """StateFileError unless `folder/stem` reads back safely. For safetensors only the header is parsed (the
    tensors are read when the state is loaded); a `.pt` is read through the weights-only loader."""
    path = state_file(folder, stem)
    if path.suffix == LEGACY_SUFFIX:
        load_legacy_pt(path)
        return
    tree, names = _read_header(path)
    _decode(tree, dict.fromkeys(names, torch.empty(0)), path)


def read_state(folder: Path, stem: str, device: str | torch.device = "cpu") -> Any:
    path = state_file(folder, stem)
    if path.suffix == LEGACY_SUFFIX:
        return load_legacy_pt(path, device)
    return load_tree(path, device)


# ---------------------------------------------------------------------------------------------------
# RNG states
# ---------------------------------------------------------------------------------------------------
def rng_state() -> dict[str, Any]:
    """Python, NumPy, torch (and CUDA) RNG states, as plain values and tensors."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"python": random.getstate(), "numpy": (name, keys.tolist(), pos, has_gauss, cached),
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def check_rng_state(state: Any, path: Path) -> dict[str, Any]:
    """`state` if every generator accepts it (tried, then the current states are put back); else StateFileError."""
    if not isinstance(state, dict) or not {"python", "numpy", "torch"} <= set(state):
        raise StateFileError(f"{path} does not hold the python, numpy and torch RNG states echoink-lite writes")
    current = rng_state()
    try:
        set_rng_state(state)
    except (TypeError, ValueError, KeyError, IndexError, RuntimeError, OverflowError) as err:
        raise StateFileError(f"{path} holds RNG states the generators refuse ({str(err).splitlines()[0][:120]})") from None
    finally:
        set_rng_state(current)
    return state
