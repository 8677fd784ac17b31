"""The base checkpoint a merge reads: where it is, what it holds, and which of its weights each LoRA module
changes. Used by ``merge`` and its verification, and by ``export`` (which checks an adapter against the base
it is published for).

- **Only what is needed, only safetensors.** A local folder is read in place; for a Hub id ``config.json``
  alone is fetched first (``read_base_config``), so the cheap checks fail before gigabytes are downloaded,
  and the weights only when the merge goes on (``download_base``). Only ``*.safetensors`` shards are read
  (``weight_files``): a ``.bin`` is a pickle, and a pickle may run code when loaded.
- **Headers, not tensors.** The shape and dtype of every base tensor come from the shard headers
  (``read_base_headers``), so the adapter's LoRA shapes are checked against every linear layer of the
  base (``base_layout``) before anything is written, with no tensor data read.
- **One line when the Hub fails.** Offline, an unknown or a gated repository all end in one ``MergeError``
  line that names the fix; huggingface_hub's per-retry warnings are kept quiet (``_hub_call``).
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .adapter_tensors import Adapter
from .adapters import BaseLayout

_HUB_PATTERNS = ["*.json", "*.safetensors", "*.jinja", "*.txt", "*.model", "spk_dict.pt"]


class MergeError(RuntimeError):
    """The merge (or export) cannot go on; the message says why and what to do."""


# --------------------------------------------------------------------------------------------
# Key names: what transformers writes on disk vs. the module names inside the thinker
# --------------------------------------------------------------------------------------------
# transformers 5 renames keys on load and back on save for Qwen2_5OmniThinkerForConditionalGeneration
# (conversion_mapping.py): disk `model.X` <-> module `model.language_model.X`, disk `audio_tower.X` <->
# `model.audio_tower.X`, disk `visual.X` <-> `model.visual.X`, and a full checkpoint adds `thinker.`.
# The reload check of the verification catches any drift of these rules in a later transformers.


def thinker_module_name(disk_key: str) -> str:
    """Module-side name of a thinker checkpoint key (without `thinker.`), as transformers loads it."""
    if disk_key.startswith(("audio_tower.", "visual.")):
        return "model." + disk_key
    if disk_key.startswith("model.") and not re.match(r"model\.(language_model|visual|audio_tower)\.", disk_key):
        return "model.language_model." + disk_key[len("model."):]
    return disk_key


def thinker_saved_name(module_name: str) -> str:
    """Key name transformers writes for a thinker module parameter (thinker-only checkpoint)."""
    if module_name.startswith("model.language_model."):
        return "model." + module_name[len("model.language_model."):]
    if module_name.startswith(("model.audio_tower.", "model.visual.")):
        return module_name[len("model."):]
    return module_name


# --------------------------------------------------------------------------------------------
# Reading the base
# --------------------------------------------------------------------------------------------


@dataclass
class Base:
    name: str  # as given (Hub id or folder)
    path: Path  # local folder
    config: dict[str, Any]  # config.json as stored
    is_full: bool
    files: list[str]  # safetensors shard file names, in order
    shapes: dict[str, tuple[list[int], str, str]] = field(default_factory=dict)  # key -> (shape, dtype, file)

    @property
    def thinker_config(self) -> dict[str, Any]:
        return self.config["thinker_config"] if self.is_full else self.config


def _is_local_like(name: str) -> bool:
    return name.startswith(("/", "./", "../", "~")) or "\\" in name or name.count("/") > 1 or Path(name).exists()


def _hub_call(what: str, name: str, fn):
    """Run a huggingface_hub download; any failure becomes one line. huggingface_hub logs two warning lines
    per retry of an unreachable Hub (five retries, utils/_http.py http_backoff); they are kept quiet here
    because the failure is reported once, below."""
    hub_logger = logging.getLogger("huggingface_hub")
    level = hub_logger.level
    hub_logger.setLevel(logging.ERROR)
    try:
        return fn()
    except Exception as err:  # offline, unknown repo, gated repo: all end here with the same advice
        first = (str(err).strip().splitlines() or [""])[0]
        raise MergeError(f"cannot {what} '{name}' from the Hugging Face Hub ({type(err).__name__}: {first}). "
                         "Fix: pass --base a local folder holding the base checkpoint, or run where the Hub is reachable.") from None
    finally:
        hub_logger.setLevel(level)


def read_base_config(name: str, revision: str | None = None) -> tuple[Path | None, dict[str, Any]]:
    """(local folder or None for a Hub id, config.json). Only config.json is fetched for a Hub id."""
    p = Path(name).expanduser()
    if p.is_dir():
        cfg = p / "config.json"
        if not cfg.is_file():
            raise MergeError(f"base '{name}' has no config.json. Fix: pass a Qwen2.5-Omni (full or thinker-only) checkpoint folder.")
        return p, json.loads(cfg.read_text())
    if _is_local_like(name):
        raise MergeError(f"base '{name}' is not a folder on this machine. Fix: pass --base the local folder or Hub id of the "
                         "model the adapter was trained on.")
    from huggingface_hub import hf_hub_download

    cfg = _hub_call("download config.json of", name, lambda: hf_hub_download(name, "config.json", revision=revision))
    return None, json.loads(Path(cfg).read_text())


def download_base(name: str, revision: str | None = None) -> Path:
    from huggingface_hub import snapshot_download

    return Path(_hub_call("download", name, lambda: snapshot_download(name, revision=revision, allow_patterns=_HUB_PATTERNS)))


def is_full_omni(name: str, config: dict[str, Any]) -> bool:
    """True for a full Qwen2.5-Omni config, False for a thinker-only one; refuses any other model."""
    mt = config.get("model_type")
    if mt == "qwen2_5_omni":
        return True
    if mt == "qwen2_5_omni_thinker":
        return False
    raise MergeError(f"base '{name}' is a '{mt}' model; echoink-lite merges into Qwen2.5-Omni "
                     "(model_type qwen2_5_omni or qwen2_5_omni_thinker). Fix: pass --base such a checkpoint.")


def weight_files(path: Path) -> list[str]:
    """Safetensors shard names of a checkpoint folder, in order; refuses pickle-only checkpoints."""
    index = path / "model.safetensors.index.json"
    if index.is_file():
        return sorted(set(json.loads(index.read_text())["weight_map"].values()))
    if (path / "model.safetensors").is_file():
        return ["model.safetensors"]
    files = sorted(p.name for p in path.glob("*.safetensors"))
    if files:
        return files
    if list(path.glob("*.bin")):
        raise MergeError(f"base '{path}' has only .bin weights (pickles), which echoink-lite does not read. "
                         "Fix: convert it to safetensors (load and save_pretrained with safe_serialization=True) or use a safetensors release.")
    raise MergeError(f"base '{path}' holds no *.safetensors weights")


def read_base_headers(base: Base) -> None:
    """Shapes and dtypes of every base tensor, from the shard headers only (no tensor data is read)."""
    from safetensors import safe_open

    for name in base.files:
        with safe_open(str(base.path / name), framework="pt") as f:
            for key in f.keys():
                s = f.get_slice(key)
                base.shapes[key] = (list(s.get_shape()), str(s.get_dtype()), name)


def torch_dtype_of(st_dtype: str) -> torch.dtype:
    """torch dtype of a safetensors header dtype name."""
    return {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16, "F64": torch.float64, "I64": torch.int64,
            "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool}.get(st_dtype, torch.uint8)


def base_layout(base: Base) -> BaseLayout:
    """The base's linear layers as the thinker names its modules, from the shard headers (2-D weights)."""
    prefix = "thinker." if base.is_full else ""
    linears = {}
    for key, (shape, _dtype, _file) in base.shapes.items():
        if key.startswith(prefix) and key.endswith(".weight") and len(shape) == 2:
            module = thinker_module_name(key[len(prefix):])[: -len(".weight")]
            linears[module] = (shape[0], shape[1])
    return BaseLayout(base.name, linears, BaseLayout.from_config(base.thinker_config, base.name).dims, complete=True)


def base_layout_for(name: str, revision: str | None = None) -> BaseLayout:
    """The linear layers of the base `name`: every layer from the shard headers of a local folder; for a Hub
    id the language model's layers from config.json alone (nothing else is downloaded)."""
    local, config = read_base_config(name, revision)
    is_full = is_full_omni(name, config)
    if local is None:
        return BaseLayout.from_config(config["thinker_config"] if is_full else config, name)
    base = Base(name, local, config, is_full, weight_files(local))
    read_base_headers(base)
    return base_layout(base)


def lora_targets(adapter: Adapter, base: Base) -> dict[str, str]:
    """{adapter module -> base checkpoint key} of an adapter that fits the base; refuses quantized weights."""
    prefix = "thinker." if base.is_full else ""
    mapping = {}
    for module in adapter.modules:
        key = prefix + thinker_saved_name(module) + ".weight"
        if key not in base.shapes:  # a checkpoint that keeps the module-side names
            key = prefix + module + ".weight"
        dtype = base.shapes[key][1]
        if dtype not in ("F32", "BF16", "F16", "F64"):
            raise MergeError(f"the base weight '{key}' of '{base.name}' is stored as {dtype}, not a float: a quantized "
                             "checkpoint? Fix: merge into the unquantized (bf16) base with --base.")
        mapping[module] = key
    return mapping
