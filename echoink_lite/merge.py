"""Merge a trained QLoRA adapter into the unquantized base weights, and export / publish adapters.

``echoink-lite merge --adapter DIR --out DIR [--base ID_OR_PATH] [--format thinker|full] [--dtype bf16|fp16|fp32]``

Why it is done this way:

- **Never into 4-bit weights.** Merging into the NF4 model that was trained re-quantizes the sum (worst
  error). The adapter is merged into the base checkpoint's own (bf16) weights instead: for every LoRA target
  ``W' = W + s * (B @ A)`` with ``s = alpha / r`` (``alpha / sqrt(r)`` with rsLoRA), computed in fp32 from the
  stored weights and cast once to the output dtype. That is exact up to the single final rounding.
- **No GPU, bounded RAM.** No model is instantiated for the merge: the base safetensors shards are read
  tensor by tensor (``safe_open``, memory-mapped) and written as output shards of at most
  ``max_shard_size`` bytes, so peak memory is about one output shard plus the adapter, not the model.
  Only safetensors are read (a ``.bin`` is a pickle and is refused).
- **Right size.** Every floating tensor of the thinker is cast to the output dtype (a bf16 merge of a bf16
  base has the base's size, not twice it); the verification measures it.
- **Thinker format** (default): a thinker-only model (``model_type qwen2_5_omni_thinker``) with the key
  names transformers itself writes for ``Qwen2_5OmniThinkerForConditionalGeneration`` (``model.layers.N``,
  ``audio_tower.``, ``visual.``, ``lm_head``), like the released EchoInk-R1-7B. From a full Omni base the
  ``thinker.*`` tensors are taken and the prefix dropped; the config is the base's ``thinker_config``.
- **Full format**: a complete Qwen2.5-Omni (needs a full base): thinker merged, ``talker.*`` and
  ``token2wav.*`` copied **bit for bit in their stored dtype** (they are not trained here, so casting them
  could only lose information; at the base's own dtype the whole folder is in that dtype), and
  ``spk_dict.pt`` copied (other tools' saved Omni models lack it and then fail to load: HarryHsing/EchoInk
  issue 1, hiyouga/LLaMA-Factory issue 7821).
- **Refuse early.** The adapter's LoRA shapes are checked against the base config and the base shard
  headers before anything is written: a mismatched base is named with the sizes that differ and the fix.
- **Verify** (default on): reload with the standard transformers classes, compare logits on fixed
  synthetic audio + image prompts against base + adapter (PEFT, unmerged), check which weights changed,
  check the size on disk. ``--no-verify`` skips it.

``echoink-lite export --adapter DIR --out DIR [--recipe FILE] [--eval-summary JSON] [--push-to-hub REPO]``
writes a clean PEFT folder (``adapter_config.json`` + ``adapter_model.safetensors``) with a model card.
``--push-to-hub`` on either command is a thin call to ``huggingface_hub.HfApi`` (create_repo + upload_folder).
"""

from __future__ import annotations

import json
import math
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .modeling import TORCH_DTYPES

DTYPE_CONFIG_NAMES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}
DTYPES = {short: TORCH_DTYPES[name] for short, name in DTYPE_CONFIG_NAMES.items()}
_ALIASES = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32", "half": "fp16", "float": "fp32"}

# Logit tolerance of the verification: max |merged - (base + adapter)| <= atol + rtol * max |reference|.
# fp32: both sides compute the same function up to summation order. bf16/fp16: the merged model holds
# round(W + dW) while the reference holds round(W) plus an unrounded LoRA path, so they differ by about one
# rounding of every weight, accumulated over the layers; 5% (bf16, 8-bit mantissa) / 2% (fp16, 11-bit) of
# the logit range is well above that noise and far below a wrong merge (a missing scale, a missing layer).
LOGIT_TOLERANCE = {"fp32": (1e-4, 1e-5), "fp16": (0.02, 0.02), "bf16": (0.05, 0.05)}

# Processor / tokenizer files copied to the merged folder when present.
_PROCESSOR_FILES = (
    "tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt", "special_tokens_map.json",
    "added_tokens.json", "chat_template.jinja", "chat_template.json", "preprocessor_config.json",
    "processor_config.json", "video_preprocessor_config.json", "tokenizer.model",
)
_HUB_PATTERNS = ["*.json", "*.safetensors", "*.jinja", "*.txt", "*.model", "spk_dict.pt"]

_LORA_KEY = re.compile(r"^base_model\.model\.(?P<module>.+)\.lora_(?P<ab>[AB])(?:\.(?P<name>[^.]+))?\.weight$")
_LAYER = re.compile(r"\.layers\.(\d+)\.")


class MergeError(RuntimeError):
    """The merge or export cannot go on; the message says why and what to do."""


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
# Reading the adapter and the base
# --------------------------------------------------------------------------------------------


@dataclass
class LoraModule:
    module: str  # thinker module name, e.g. model.language_model.layers.0.self_attn.q_proj
    A: torch.Tensor  # [r, in]
    B: torch.Tensor  # [out, r]
    scale: float

    @property
    def rank(self) -> int:
        return int(self.A.shape[0])

    def delta(self) -> torch.Tensor:
        """scale * B @ A in fp32, shape [out, in]."""
        return (self.B.float() @ self.A.float()) * self.scale


@dataclass
class Adapter:
    path: Path
    config: dict[str, Any]
    modules: dict[str, LoraModule]

    @property
    def base(self) -> str | None:
        return self.config.get("base_model_name_or_path") or None


def read_adapter(adapter_dir: str | Path) -> Adapter:
    """Read a PEFT LoRA folder (safetensors only); refuse what a plain W + sBA merge cannot represent."""
    path = Path(adapter_dir)
    cfg_file = path / "adapter_config.json"
    if not cfg_file.is_file():
        raise MergeError(f"{path}: no adapter_config.json. Fix: pass the folder a training run saved its adapter to (e.g. RUN/adapter).")
    config = json.loads(cfg_file.read_text())
    weights = path / "adapter_model.safetensors"
    if not weights.is_file():
        if (path / "adapter_model.bin").is_file():
            raise MergeError(f"{path}: adapter_model.bin is a pickle and is not read; echoink-lite reads safetensors only. "
                             "Fix: re-save the adapter with save_pretrained(..., safe_serialization=True).")
        raise MergeError(f"{path}: no adapter_model.safetensors")
    if config.get("peft_type", "LORA") != "LORA":
        raise MergeError(f"{path}: a {config.get('peft_type')} adapter; only LoRA adapters can be merged here")
    unsupported = [
        name for name, bad in (
            ("use_dora", config.get("use_dora")),
            ("modules_to_save", config.get("modules_to_save")),
            ("trainable_token_indices", config.get("trainable_token_indices")),
            ("lora_bias", config.get("lora_bias")),
            ("fan_in_fan_out", config.get("fan_in_fan_out")),
            ("layer_replication", config.get("layer_replication")),
        ) if bad
    ]
    if unsupported:
        raise MergeError(f"{path}: adapter_config.json sets {', '.join(unsupported)}; this merge handles plain LoRA "
                         "(W + scale * B @ A) only, as trained by echoink-lite")

    from safetensors import safe_open

    parts: dict[str, dict[str, torch.Tensor]] = {}
    with safe_open(str(weights), framework="pt") as f:
        for key in f.keys():
            m = _LORA_KEY.match(key)
            if m is None:
                raise MergeError(f"{weights}: unexpected tensor '{key}' (not a LoRA A/B weight); this merge handles plain LoRA only")
            parts.setdefault(m["module"], {})[m["ab"]] = f.get_tensor(key)
    if not parts:
        raise MergeError(f"{weights}: no LoRA weights in the file")

    r0, alpha0 = int(config.get("r", 8)), float(config.get("lora_alpha", 8))
    rank_pattern, alpha_pattern = config.get("rank_pattern") or {}, config.get("alpha_pattern") or {}
    modules: dict[str, LoraModule] = {}
    for module, ab in sorted(parts.items()):
        if set(ab) != {"A", "B"}:
            raise MergeError(f"{weights}: module '{module}' has lora_{''.join(ab)} but not both lora_A and lora_B")
        A, B = ab["A"], ab["B"]
        if A.dim() != 2 or B.dim() != 2 or A.shape[0] != B.shape[1]:
            raise MergeError(f"{weights}: module '{module}': lora_A {list(A.shape)} and lora_B {list(B.shape)} do not form B @ A")
        r = _pattern_value(rank_pattern, module, r0)
        alpha = float(_pattern_value(alpha_pattern, module, alpha0))
        if A.shape[0] != r:
            raise MergeError(f"{weights}: module '{module}' has rank {A.shape[0]} but adapter_config.json says r={r}")
        scale = alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r
        modules[module] = LoraModule(module, A, B, scale)
    return Adapter(path, config, modules)


def _pattern_value(patterns: dict[str, Any], module: str, default):
    # PEFT's rule (peft.utils.other.get_pattern_key): a pattern matches the end of the module name.
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


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
    try:
        return fn()
    except Exception as err:  # offline, unknown repo, gated repo: all end here with the same advice
        raise MergeError(f"cannot {what} '{name}' from the Hugging Face Hub: {type(err).__name__}: {err}\n"
                         "Fix: pass --base a local folder holding the base checkpoint, or run where the Hub is reachable.") from None


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


def _model_type_check(name: str, config: dict[str, Any]) -> bool:
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


# --------------------------------------------------------------------------------------------
# Does the adapter fit the base?
# --------------------------------------------------------------------------------------------


def _text_dims(thinker_cfg: dict[str, Any]) -> dict[str, int]:
    t = thinker_cfg.get("text_config") or thinker_cfg
    hidden, heads = int(t["hidden_size"]), int(t["num_attention_heads"])
    head_dim = int(t.get("head_dim") or hidden // heads)
    return dict(hidden_size=hidden, intermediate_size=int(t["intermediate_size"]), num_hidden_layers=int(t["num_hidden_layers"]),
                num_attention_heads=heads, num_key_value_heads=int(t.get("num_key_value_heads") or heads), head_dim=head_dim)


def _expected_shape(proj: str, d: dict[str, int]) -> tuple[int, int] | None:
    h, i, hd = d["hidden_size"], d["intermediate_size"], d["head_dim"]
    return {
        "q_proj": (d["num_attention_heads"] * hd, h), "k_proj": (d["num_key_value_heads"] * hd, h),
        "v_proj": (d["num_key_value_heads"] * hd, h), "o_proj": (h, d["num_attention_heads"] * hd),
        "gate_proj": (i, h), "up_proj": (i, h), "down_proj": (h, i),
    }.get(proj)


def _adapter_implied_dims(adapter: Adapter) -> dict[str, int]:
    """Sizes the adapter's LoRA shapes reveal about the model it was trained on (for the error message)."""
    out: dict[str, int] = {}
    for name, lm in adapter.modules.items():
        proj = name.rsplit(".", 1)[-1]
        if proj in ("q_proj", "gate_proj", "up_proj"):
            out.setdefault("hidden_size", int(lm.A.shape[1]))
        elif proj == "down_proj":
            out.setdefault("intermediate_size", int(lm.A.shape[1]))
        elif proj in ("k_proj", "v_proj"):
            out.setdefault("kv_width (num_key_value_heads x head_dim)", int(lm.B.shape[0]))
    layers = [int(m.group(1)) for name in adapter.modules if (m := _LAYER.search("." + name + "."))]
    if layers:
        out["num_hidden_layers (at least)"] = max(layers) + 1
    order = ["hidden_size", "intermediate_size", "num_hidden_layers (at least)", "kv_width (num_key_value_heads x head_dim)"]
    return {k: out[k] for k in order if k in out}


def check_adapter_fits(adapter: Adapter, base: Base, base_shapes: bool = True) -> dict[str, str]:
    """Check every LoRA A/B against the base (config, then shard headers when read); return
    {adapter module -> base checkpoint key}. Raises MergeError naming the mismatches and the fix."""
    dims = _text_dims(base.thinker_config)
    prefix = "thinker." if base.is_full else ""
    problems: list[str] = []
    mapping: dict[str, str] = {}
    by_module: dict[str, str] = {}
    if base_shapes:
        for key in base.shapes:
            if key.startswith(prefix):
                by_module[thinker_module_name(key[len(prefix):])] = key
    for name, lm in adapter.modules.items():
        a_in, b_out = int(lm.A.shape[1]), int(lm.B.shape[0])
        proj = name.rsplit(".", 1)[-1]
        lm_layer = re.match(r"model\.language_model\.layers\.(\d+)\.(self_attn|mlp)\.", name)
        if lm_layer and int(lm_layer.group(1)) >= dims["num_hidden_layers"]:
            problems.append(f"{name}: layer {lm_layer.group(1)} does not exist, the base has {dims['num_hidden_layers']} layers")
            continue
        exp = _expected_shape(proj, dims) if lm_layer else None
        if exp is not None and (b_out, a_in) != exp:
            problems.append(f"{name}: LoRA gives a [{b_out}, {a_in}] update (lora_B {list(lm.B.shape)}, lora_A {list(lm.A.shape)}) "
                            f"but the base {proj} is [{exp[0]}, {exp[1]}] per its config")
            continue
        if not base_shapes:
            continue
        key = by_module.get(name + ".weight")
        if key is None:
            problems.append(f"{name}: no such weight in the base checkpoint (looked for '{prefix}{thinker_saved_name(name)}.weight')")
            continue
        shape, dtype, _file = base.shapes[key]
        if len(shape) != 2 or [b_out, a_in] != shape:
            problems.append(f"{name}: LoRA gives a [{b_out}, {a_in}] update but the base weight '{key}' is {shape}")
            continue
        if dtype not in ("F32", "BF16", "F16", "F64"):
            problems.append(f"{name}: the base weight '{key}' is stored as {dtype}, not a float: a quantized checkpoint? "
                            "Merge into the unquantized (bf16) base")
            continue
        mapping[name] = key
    if base_shapes:
        _check_target_modules(adapter, by_module, problems)
    if problems:
        shown = "\n  - ".join(problems[:6]) + (f"\n  - ... and {len(problems) - 6} more" if len(problems) > 6 else "")
        implied = _adapter_implied_dims(adapter)
        base_dims = ", ".join(f"{k}={dims[k]}" for k in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_key_value_heads"))
        base_dims += f", kv_width={dims['num_key_value_heads'] * dims['head_dim']}"
        hint = f" (adapter_config.json names '{adapter.base}')" if adapter.base else ""
        raise MergeError(
            f"the adapter {adapter.path} does not fit the base '{base.name}':\n  - {shown}\n"
            f"The adapter's shapes imply {', '.join(f'{k}={v}' for k, v in implied.items()) or 'other sizes'}; "
            f"the base has {base_dims}.\n"
            f"Fix: merge into the base model the adapter was trained on{hint}: pass it with --base."
        )
    return mapping


def _check_target_modules(adapter: Adapter, by_module: dict[str, str], problems: list[str]) -> None:
    """Every target named in adapter_config.json must exist in the base (a regex must match something)."""
    targets = adapter.config.get("target_modules")
    module_names = {k[: -len(".weight")] for k in by_module if k.endswith(".weight")}
    if isinstance(targets, str):
        if not any(re.fullmatch(targets, m) for m in module_names):
            problems.append(f"target_modules regex '{targets}' matches no module of the base")
    elif targets:
        for t in targets:
            if not any(m == t or m.endswith("." + t) for m in module_names):
                problems.append(f"target module '{t}' does not exist in the base")


# --------------------------------------------------------------------------------------------
# The merge
# --------------------------------------------------------------------------------------------


def merged_weight(weight: torch.Tensor, lm: LoraModule, dtype: torch.dtype) -> torch.Tensor:
    """W + s * B @ A in fp32 from the stored base weight, cast once to `dtype`."""
    return (weight.float() + lm.delta()).to(dtype)


@dataclass
class _Planned:
    out_key: str
    base_key: str
    base_file: str
    dtype: torch.dtype | None  # None = keep the stored dtype
    nbytes: int
    numel: int
    lora: str | None  # adapter module merged into this tensor


def _torch_dtype(st_dtype: str) -> torch.dtype:
    return {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16, "F64": torch.float64, "I64": torch.int64,
            "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool}.get(st_dtype, torch.uint8)


def _plan(base: Base, fmt: str, dtype: torch.dtype, mapping: dict[str, str]) -> list[_Planned]:
    by_key = {v: k for k, v in mapping.items()}
    plan: list[_Planned] = []
    for key, (shape, st_dtype, file) in base.shapes.items():
        numel = math.prod(shape)
        stored = _torch_dtype(st_dtype)
        is_thinker = key.startswith("thinker.") if base.is_full else True
        if not is_thinker and fmt == "thinker":
            continue
        if is_thinker:
            bare = key[len("thinker."):] if base.is_full else key
            saved = thinker_saved_name(thinker_module_name(bare))
            out_key = ("thinker." + saved) if fmt == "full" else saved
            out_dtype = dtype if stored.is_floating_point else None
        else:  # talker / token2wav of a full checkpoint: copied bit for bit
            out_key, out_dtype = key, None
        itemsize = (out_dtype or stored).itemsize
        plan.append(_Planned(out_key, key, file, out_dtype, numel * itemsize, numel, by_key.get(key)))
    # Keep the base's shard order, then key order inside a shard (deterministic output).
    order = {f: i for i, f in enumerate(base.files)}
    plan.sort(key=lambda p: (order[p.base_file], p.base_key))
    return plan


def _shard_groups(plan: list[_Planned], max_shard_bytes: int) -> list[list[_Planned]]:
    groups: list[list[_Planned]] = [[]]
    size = 0
    for item in plan:
        if groups[-1] and size + item.nbytes > max_shard_bytes:
            groups.append([])
            size = 0
        groups[-1].append(item)
        size += item.nbytes
    return [g for g in groups if g]


def _write_weights(base: Base, plan: list[_Planned], adapter: Adapter, out: Path, max_shard_bytes: int, progress=None) -> list[str]:
    from safetensors import safe_open
    from safetensors.torch import save_file

    groups = _shard_groups(plan, max_shard_bytes)
    n = len(groups)
    names = ["model.safetensors"] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    weight_map: dict[str, str] = {}
    handles: dict[str, Any] = {}
    try:
        for name, group in zip(names, groups):
            tensors: dict[str, torch.Tensor] = {}
            for item in group:
                if item.base_file not in handles:
                    # Shards are visited in order: close the ones already done, so one mapping stays open.
                    for f in [f for f in handles if f != item.base_file]:
                        handles.pop(f).__exit__(None, None, None)
                    handles[item.base_file] = safe_open(str(base.path / item.base_file), framework="pt").__enter__()
                t = handles[item.base_file].get_tensor(item.base_key)
                if item.lora is not None:
                    t = merged_weight(t, adapter.modules[item.lora], item.dtype or t.dtype)
                elif item.dtype is not None and t.dtype != item.dtype:
                    t = t.to(item.dtype)
                tensors[item.out_key] = t.contiguous()
                weight_map[item.out_key] = name
            save_file(tensors, str(out / name), metadata={"format": "pt"})
            del tensors
            if progress is not None:
                progress()
    finally:
        for h in handles.values():
            h.__exit__(None, None, None)
    if n > 1:
        index = {
            "metadata": {"total_size": sum(p.nbytes for p in plan), "total_parameters": sum(p.numel for p in plan)},
            "weight_map": dict(sorted(weight_map.items())),
        }
        (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    return names


def _set_config_dtype(cfg: dict[str, Any], dtype_name: str) -> None:
    cfg["dtype"] = dtype_name
    if "torch_dtype" in cfg:
        cfg["torch_dtype"] = dtype_name


def _set_use_cache(cfg: dict[str, Any]) -> None:
    cfg["use_cache"] = True
    if isinstance(cfg.get("text_config"), dict):
        cfg["text_config"]["use_cache"] = True


def _write_configs(base: Base, fmt: str, dtype_key: str, out: Path) -> None:
    import transformers

    dname = DTYPE_CONFIG_NAMES[dtype_key]
    if fmt == "thinker":
        cfg = json.loads(json.dumps(base.thinker_config))
        cfg["model_type"] = "qwen2_5_omni_thinker"
        cfg["architectures"] = ["Qwen2_5OmniThinkerForConditionalGeneration"]
        for sub in ("text_config", "audio_config", "vision_config"):
            if isinstance(cfg.get(sub), dict) and "dtype" in cfg[sub]:
                cfg[sub]["dtype"] = dname
    else:
        cfg = json.loads(json.dumps(base.config))
        cfg["architectures"] = ["Qwen2_5OmniForConditionalGeneration"]
        _set_config_dtype(cfg["thinker_config"], dname)
        _set_use_cache(cfg["thinker_config"])
    _set_config_dtype(cfg, dname)
    _set_use_cache(cfg)
    cfg["transformers_version"] = transformers.__version__
    (out / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")

    gen_file = base.path / "generation_config.json"
    gen = json.loads(gen_file.read_text()) if gen_file.is_file() else {}
    gen["use_cache"] = True
    (out / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")


def _copy_side_files(base: Base, fmt: str, out: Path) -> list[str]:
    copied = []
    for name in _PROCESSOR_FILES:
        src = base.path / name
        if src.is_file():
            shutil.copy2(src, out / name)
            copied.append(name)
    if fmt == "full" and (base.path / "spk_dict.pt").is_file():
        shutil.copy2(base.path / "spk_dict.pt", out / "spk_dict.pt")
        copied.append("spk_dict.pt")
    return copied


def _write_merged_card(out: Path, base_name: str, adapter: Adapter, fmt: str, dtype_key: str) -> None:
    arch = "Qwen2_5OmniThinkerForConditionalGeneration" if fmt == "thinker" else "Qwen2_5OmniForConditionalGeneration"
    text = f"""---
base_model: {base_name}
library_name: transformers
tags: [qwen2.5-omni, grpo, echoink-lite, merged-lora]
---

# Merged EchoInk-lite model

LoRA adapter `{adapter.path.name}` (r={adapter.config.get('r')}, lora_alpha={adapter.config.get('lora_alpha')}, \
rsLoRA={bool(adapter.config.get('use_rslora'))}) merged into the unquantized weights of `{base_name}`:
`W' = W + scale * B @ A` computed in fp32 and cast once to {DTYPE_CONFIG_NAMES[dtype_key]}.
Format: `{fmt}` (load with `transformers.{arch}`).
{"The talker, token2wav and spk_dict.pt are copied unchanged from the base." if fmt == "full" else ""}
"""
    (out / "README.md").write_text(text)


def _resolve_format_dtype(fmt: str, dtype: str) -> tuple[str, str]:
    if fmt not in ("thinker", "full"):
        raise MergeError(f"--format must be 'thinker' or 'full', got '{fmt}'")
    d = _ALIASES.get(dtype, dtype)
    if d not in DTYPES:
        raise MergeError(f"--dtype must be one of bf16, fp16, fp32, got '{dtype}'")
    return fmt, d


def _check_out(out: Path, adapter_dir: Path, base_path: Path | None) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise MergeError(f"--out {out} exists and is not empty. Fix: pass a new folder (nothing is overwritten).")
    for other, what in ((adapter_dir, "adapter"), (base_path, "base")):
        if other is not None and out.resolve() == Path(other).resolve():
            raise MergeError(f"--out must not be the {what} folder")


def merge_adapter(adapter: str | Path, out: str | Path, base: str | None = None, format: str = "thinker", dtype: str = "bf16",
                  verify: bool = True, console=None, *, revision: str | None = None, verify_device: str = "cpu",
                  max_shard_size: int = 5 * 1024**3, verify_prompts: int = 2) -> dict[str, Any]:
    """Merge `adapter` into the unquantized `base` and write a checkpoint to `out`; returns a report dict
    (with the verification under "verification" when `verify`). Raises MergeError before writing anything
    when the inputs do not fit together."""
    from rich.console import Console

    console = console or Console()
    fmt, dtype_key = _resolve_format_dtype(format, dtype)
    adapter_dir, out = Path(adapter), Path(out)
    t0 = time.monotonic()

    ad = read_adapter(adapter_dir)
    base_name = base or ad.base
    if not base_name:
        raise MergeError(f"{adapter_dir}/adapter_config.json names no base_model_name_or_path. Fix: pass --base (Hub id or folder).")

    # 1. Cheap checks on the config alone (for a Hub id nothing but config.json is downloaded yet).
    local, config = read_base_config(base_name, revision)
    is_full = _model_type_check(base_name, config)
    if fmt == "full" and not is_full:
        raise MergeError(f"--format full needs a full Qwen2.5-Omni base (thinker + talker + token2wav + spk_dict.pt), but "
                         f"'{base_name}' is thinker-only (model_type qwen2_5_omni_thinker). Fix: pass --base the full "
                         "checkpoint the thinker came from (e.g. Qwen/Qwen2.5-Omni-7B), or use --format thinker.")
    probe = Base(base_name, local or Path("."), config, is_full, [])
    check_adapter_fits(ad, probe, base_shapes=False)
    _check_out(out, adapter_dir, local)

    # 2. Shard headers: exact shapes and dtypes of every base tensor.
    path = local or download_base(base_name, revision)
    b = Base(base_name, path, config, is_full, weight_files(path))
    read_base_headers(b)
    mapping = check_adapter_fits(ad, b)
    if fmt == "full" and not any(k.startswith(("talker.", "token2wav.")) for k in b.shapes):
        raise MergeError(f"--format full: base '{base_name}' has no talker.* / token2wav.* weights. Fix: use --format thinker.")
    plan = _plan(b, fmt, DTYPES[dtype_key], mapping)

    # 3. Write (into a sibling temp folder, renamed at the end: an interrupted merge leaves no half model at --out).
    tmp = out.with_name(out.name + ".partial")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    console.print(f"merging {len(mapping)} LoRA modules of {adapter_dir} into '{base_name}' "
                  f"({'full' if is_full else 'thinker-only'} base) -> {fmt} format, {DTYPE_CONFIG_NAMES[dtype_key]}", highlight=False)
    from rich.progress import Progress

    n_groups = len(_shard_groups(plan, max_shard_size))
    with Progress(console=console, transient=True) as progress:
        task = progress.add_task("writing shards", total=n_groups)
        shards = _write_weights(b, plan, ad, tmp, max_shard_size, progress=lambda: progress.advance(task))
    _write_configs(b, fmt, dtype_key, tmp)
    copied = _copy_side_files(b, fmt, tmp)
    _write_merged_card(tmp, base_name, ad, fmt, dtype_key)
    if out.exists():
        out.rmdir()  # empty (checked above)
    tmp.rename(out)

    report: dict[str, Any] = {
        "out": str(out), "base": base_name, "base_path": str(path), "adapter": str(adapter_dir), "format": fmt,
        "dtype": DTYPE_CONFIG_NAMES[dtype_key], "base_is_full": is_full, "lora_modules_merged": len(mapping),
        "scale": sorted({lm.scale for lm in ad.modules.values()}), "use_rslora": bool(ad.config.get("use_rslora")),
        "shards": shards, "tensors": len(plan), "copied_files": copied, "merge_seconds": round(time.monotonic() - t0, 2),
    }
    console.print(f"wrote {len(plan)} tensors in {len(shards)} shard(s) to {out} in {report['merge_seconds']} s", highlight=False)
    if verify:
        report["verification"] = verify_merge(out, b, ad, mapping, fmt, dtype_key, device=verify_device,
                                              n_prompts=verify_prompts, console=console)
        report["ok"] = report["verification"]["ok"]
    else:
        report["ok"] = None
    return report


# --------------------------------------------------------------------------------------------
# Verification
# --------------------------------------------------------------------------------------------


def _out_index(out: Path) -> dict[str, str]:
    index = out / "model.safetensors.index.json"
    if index.is_file():
        return json.loads(index.read_text())["weight_map"]
    from safetensors import safe_open

    with safe_open(str(out / "model.safetensors"), framework="pt") as f:
        return {k: "model.safetensors" for k in f.keys()}


def check_weights(out: Path, base: Base, adapter: Adapter, mapping: dict[str, str], fmt: str, dtype_key: str) -> dict[str, Any]:
    """Read back every output tensor and compare with the base: LoRA targets must equal
    cast(W + s*B@A) (recomputed here in fp64) and differ from cast(W); all other tensors must equal the base
    after the dtype cast (talker / token2wav: bit-identical, stored dtype)."""
    from safetensors import safe_open

    dtype = DTYPES[dtype_key]
    plan = _plan(base, fmt, dtype, mapping)
    index = _out_index(out)
    expected_keys = {p.out_key for p in plan}
    missing, extra = sorted(expected_keys - set(index)), sorted(set(index) - expected_keys)
    changed_ok = unchanged_lora = bad_lora = other_equal = other_differ = 0
    max_merge_err = 0.0
    problems: list[str] = []
    zero_b: list[str] = []  # LoRA targets whose B is all zero (LoRA's initial value): merged weight = base
    handles: dict[str, Any] = {}

    def handle(folder: Path, name: str):
        k = f"{folder}/{name}"
        if k not in handles:
            handles[k] = safe_open(str(folder / name), framework="pt").__enter__()
        return handles[k]

    try:
        for p in plan:
            if p.out_key not in index:
                continue
            got = handle(out, index[p.out_key]).get_tensor(p.out_key)
            ref = handle(base.path, p.base_file).get_tensor(p.base_key)
            cast = ref.to(p.dtype) if p.dtype is not None else ref
            if p.lora is None:
                if got.dtype == cast.dtype and torch.equal(got, cast):
                    other_equal += 1
                else:
                    other_differ += 1
                    problems.append(f"{p.out_key}: differs from the base but has no LoRA")
                continue
            lm = adapter.modules[p.lora]
            exact = ref.double() + (lm.B.double() @ lm.A.double()) * lm.scale
            err = (got.double() - exact).abs().max().item()
            # One rounding to the output dtype: |err| <= eps/2 * |exact| (plus the fp32 compute noise).
            bound = (torch.finfo(got.dtype).eps * exact.abs().max().item()) + 1e-6
            max_merge_err = max(max_merge_err, err)
            if err > bound:
                bad_lora += 1
                problems.append(f"{p.out_key}: merged weight off by {err:.3g} (bound {bound:.3g})")
            elif torch.equal(got, cast):
                unchanged_lora += 1
                if lm.B.any():
                    problems.append(f"{p.out_key}: LoRA target equals the base although its B is non-zero "
                                    f"(update below {got.dtype} rounding?)")
                else:
                    zero_b.append(p.out_key)  # never updated: reported once, below
            else:
                changed_ok += 1
    finally:
        for h in handles.values():
            h.__exit__(None, None, None)
    # Every B zero: an untrained adapter (e.g. a smoke run), merged exactly (= base); one line, not one per tensor.
    untrained = bool(mapping) and len(zero_b) == len(mapping)
    if zero_b and not untrained:
        problems.append(f"{len(zero_b)} of {len(mapping)} LoRA targets have B = 0 (never updated) and equal the base, "
                        f"e.g. {zero_b[0]}")
    if missing:
        problems.append(f"{len(missing)} expected tensors missing, e.g. {missing[:3]}")
    if extra:
        problems.append(f"{len(extra)} unexpected tensors, e.g. {extra[:3]}")
    return {
        "lora_tensors_changed": changed_ok, "lora_tensors_expected": len(mapping), "lora_tensors_unchanged": unchanged_lora,
        "lora_tensors_wrong": bad_lora, "max_merge_error_vs_fp64": max_merge_err, "other_tensors_equal": other_equal,
        "other_tensors_differ": other_differ, "missing_keys": len(missing), "unexpected_keys": len(extra),
        "untrained_adapter": untrained,
        "ok": not problems and (changed_ok == len(mapping) or untrained), "problems": problems[:10],
    }


def check_size(out: Path, base: Base, fmt: str, dtype_key: str) -> dict[str, Any]:
    """Bytes of the tensors written (from the shard headers) against the base's parameter count at the
    output dtype (talker / token2wav at their stored dtype): must agree within 5% (an accidental fp32
    copy would be 2x)."""
    from safetensors import safe_open

    dtype = DTYPES[dtype_key]
    expected = params = 0
    for key, (shape, st_dtype, _file) in base.shapes.items():
        thinker = key.startswith("thinker.") or not base.is_full
        if fmt == "thinker" and not thinker:
            continue
        stored = _torch_dtype(st_dtype)
        n = math.prod(shape)
        params += n
        expected += n * (dtype.itemsize if thinker and stored.is_floating_point else stored.itemsize)
    written = 0
    files = sorted(set(_out_index(out).values()))
    for name in files:
        with safe_open(str(out / name), framework="pt") as f:
            for key in f.keys():
                s = f.get_slice(key)
                written += math.prod(s.get_shape()) * _torch_dtype(str(s.get_dtype())).itemsize
    file_bytes = sum((out / n).stat().st_size for n in files)
    ratio = written / expected if expected else float("nan")
    return {"parameters": params, "expected_tensor_bytes": expected, "tensor_bytes": written, "file_bytes": file_bytes,
            "ratio": round(ratio, 4), "ok": abs(ratio - 1.0) <= 0.05}


def _verification_inputs(processor, n: int) -> list[dict[str, torch.Tensor]]:
    """Fixed synthetic prompts (coloured noisy image + tone), encoded with the kit's prompt path."""
    import numpy as np
    from PIL import Image

    from .data import build_prompt_text
    from .prompting import collate, encode_text_prompt
    from .synth import SYNTH_OPTIONS, SYNTH_QUESTION

    rng = np.random.default_rng(1234)
    batches = []
    specs = [((200, 40, 40), 300.0), ((40, 40, 200), 1200.0), ((40, 200, 40), 600.0), ((200, 200, 40), 900.0)]
    for i in range(n):
        colour, hz = specs[i % len(specs)]
        pixels = np.clip(np.array(colour, dtype=np.float64) + rng.normal(0, 30, size=(56, 56, 3)), 0, 255)
        image = Image.fromarray(pixels.round().astype(np.uint8))
        t = np.arange(16000) / 16000.0
        audio = (0.5 * np.sin(2 * np.pi * hz * t) + rng.normal(0, 0.02, t.shape)).astype(np.float32)
        text = build_prompt_text(SYNTH_QUESTION, SYNTH_OPTIONS)
        batches.append(collate([encode_text_prompt(processor, text, image, audio)], pad_token_id=processor.tokenizer.pad_token_id or 0))
    return batches


@torch.no_grad()
def _logits(model, batches, device, dtype) -> list[torch.Tensor]:
    from .prompting import to_device

    out = []
    for batch in batches:
        out.append(model(**to_device(batch, device, dtype)).logits.float().cpu())
    return out


def _full_module_name(key: str) -> str:
    return "thinker." + thinker_module_name(key[len("thinker."):]) if key.startswith("thinker.") else key


def _compare_loaded(model, out: Path) -> dict[str, Any]:
    """Loaded full model vs the merged files: every file tensor must land in a model tensor of the same
    value (after the load dtype cast) and every model tensor must come from the file."""
    from safetensors import safe_open

    state = model.state_dict()
    index = _out_index(out)
    seen: set[str] = set()
    unexpected = mismatched = 0
    for name in sorted(set(index.values())):
        with safe_open(str(out / name), framework="pt") as f:
            for key in f.keys():
                module_key = _full_module_name(key)
                if module_key not in state:
                    unexpected += 1
                    continue
                seen.add(module_key)
                loaded = state[module_key]
                saved = f.get_tensor(key)
                if loaded.shape != saved.shape or not torch.equal(loaded.cpu(), saved.to(loaded.dtype)):
                    mismatched += 1
    missing = len(set(state) - seen)
    return {"class": type(model).__name__, "missing_keys": missing, "unexpected_keys": unexpected, "mismatched_keys": mismatched}


def check_logits(out: Path, base: Base, adapter: Adapter, fmt: str, dtype_key: str, device: str = "cpu", n_prompts: int = 2) -> dict[str, Any]:
    """Logits of the merged model (reloaded with the standard class) vs the base + adapter unmerged (PEFT),
    same dtype and device. The reference runs first and is freed before the merged model loads (peak
    memory about one model)."""
    import gc

    from peft import PeftModel
    from transformers import AutoConfig, Qwen2_5OmniForConditionalGeneration, Qwen2_5OmniThinkerForConditionalGeneration

    from .modeling import load_processor, load_thinker

    dtype = DTYPES[dtype_key]
    dname = DTYPE_CONFIG_NAMES[dtype_key]
    processor = load_processor(str(out))  # the processor files copied into the merged folder
    batches = _verification_inputs(processor, n_prompts)

    ref_model = load_thinker(str(base.path), dtype=dname, quantization=None, device=device)
    ref_model = PeftModel.from_pretrained(ref_model, str(adapter.path)).eval()
    ref = _logits(ref_model, batches, device, dtype)
    with ref_model.disable_adapter():
        plain = _logits(ref_model, batches, device, dtype)
    del ref_model
    gc.collect()

    reload_info: dict[str, Any] = {}
    if fmt == "full":
        # The plain user call (it also loads spk_dict.pt; transformers 5.23 breaks with output_loading_info=True
        # on this class), then every tensor of the loaded model is compared with the file it came from.
        full = Qwen2_5OmniForConditionalGeneration.from_pretrained(str(out), dtype=dtype, use_safetensors=True)
        reload_info["full_model"] = _compare_loaded(full, out)
        reload_info["full_model"]["speakers"] = len(getattr(full, "speaker_map", {}) or {})
        del full
        gc.collect()
        cfg = AutoConfig.from_pretrained(str(out)).thinker_config
        merged, info = Qwen2_5OmniThinkerForConditionalGeneration.from_pretrained(
            str(out), config=cfg, dtype=dtype, output_loading_info=True, use_safetensors=True, device_map={"": device})
        # The thinker class ignores talker.* / token2wav.* by design (_keys_to_ignore_on_load_unexpected).
        info["unexpected_keys"] = [k for k in info.get("unexpected_keys", []) if not k.startswith(("talker", "token2wav"))]
    else:
        merged, info = Qwen2_5OmniThinkerForConditionalGeneration.from_pretrained(
            str(out), dtype=dtype, output_loading_info=True, use_safetensors=True, device_map={"": device})
    reload_info["thinker"] = {k: len(v) for k, v in info.items() if k in ("missing_keys", "unexpected_keys", "mismatched_keys")}
    reload_info["thinker"]["class"] = type(merged).__name__
    merged.eval()
    got = _logits(merged, batches, device, dtype)
    del merged
    gc.collect()

    diff = max((g - r).abs().max().item() for g, r in zip(got, ref))
    mean_diff = sum((g - r).abs().mean().item() for g, r in zip(got, ref)) / len(ref)
    effect = max((p - r).abs().max().item() for p, r in zip(plain, ref))
    scale = max(r.abs().max().item() for r in ref)
    atol, rtol = LOGIT_TOLERANCE[dtype_key]
    tol = atol + rtol * scale
    agree = sum((g.argmax(-1) == r.argmax(-1)).float().sum().item() for g, r in zip(got, ref))
    total = sum(r.shape[0] * r.shape[1] for r in ref)
    reload_ok = all(v.get(k, 0) == 0 for v in reload_info.values() for k in ("missing_keys", "unexpected_keys", "mismatched_keys"))
    return {
        "prompts": len(batches), "tokens": int(total), "device": device, "dtype": dname,
        "max_abs_diff": diff, "mean_abs_diff": mean_diff, "tolerance": tol, "tolerance_rule": f"{atol} + {rtol} * max|logit| ({scale:.3g})",
        "adapter_effect_max_abs": effect, "argmax_agreement": agree / total if total else None, "reload": reload_info,
        "reload_ok": reload_ok, "ok": reload_ok and diff <= tol,
    }


def verify_merge(out: Path, base: Base, adapter: Adapter, mapping: dict[str, str], fmt: str, dtype_key: str,
                 device: str = "cpu", n_prompts: int = 2, console=None) -> dict[str, Any]:
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    console.print("verifying: weights, size on disk, reload + logits against base + adapter ...")
    weights = check_weights(out, base, adapter, mapping, fmt, dtype_key)
    size = check_size(out, base, fmt, dtype_key)
    logits = check_logits(out, base, adapter, fmt, dtype_key, device=device, n_prompts=n_prompts)
    result = {"weights": weights, "size": size, "logits": logits, "ok": bool(weights["ok"] and size["ok"] and logits["ok"])}

    table = Table(title="merge verification")
    table.add_column("check")
    table.add_column("result")
    table.add_column("")
    mark = lambda ok: "[green]ok[/]" if ok else "[bold red]FAIL[/]"  # noqa: E731
    if weights["untrained_adapter"]:
        table.add_row("LoRA targets changed", f"0/{weights['lora_tensors_expected']}: every LoRA B is zero, merged = base",
                      "[yellow]untrained[/]")
    else:
        table.add_row("LoRA targets changed", f"{weights['lora_tensors_changed']}/{weights['lora_tensors_expected']} "
                      f"(max error vs fp64 merge {weights['max_merge_error_vs_fp64']:.2e})", mark(weights["lora_tensors_changed"] == weights["lora_tensors_expected"] and not weights["lora_tensors_wrong"]))
    table.add_row("other tensors equal to base", f"{weights['other_tensors_equal']} equal, {weights['other_tensors_differ']} differ",
                  mark(weights["other_tensors_differ"] == 0 and not weights["missing_keys"] and not weights["unexpected_keys"]))
    table.add_row("size on disk", f"{size['tensor_bytes'] / 1e6:.2f} MB tensors, expected {size['expected_tensor_bytes'] / 1e6:.2f} MB "
                  f"({size['parameters']:,} params); ratio {size['ratio']}", mark(size["ok"]))
    table.add_row("reload (standard classes)", ", ".join(f"{k}: {v['class']} missing {v['missing_keys']} unexpected {v['unexpected_keys']} mismatched {v['mismatched_keys']}"
                  for k, v in logits["reload"].items()), mark(logits["reload_ok"]))
    table.add_row(f"logits vs base+adapter ({logits['dtype']}, {logits['device']})",
                  f"max |diff| {logits['max_abs_diff']:.3g} <= tol {logits['tolerance']:.3g} [{logits['tolerance_rule']}]; "
                  f"adapter effect {logits['adapter_effect_max_abs']:.3g}; argmax agree {logits['argmax_agreement']:.1%}", mark(logits["ok"]))
    console.print(table)
    if weights["untrained_adapter"]:
        console.print(f"[yellow]untrained adapter[/]: all {weights['lora_tensors_expected']} LoRA B matrices are zero, so the "
                      "merged model equals the base. Expected after a smoke run (`demo --quick`); after real training "
                      "it means no update reached the adapter.", highlight=False)
    for p in weights["problems"]:
        console.print(f"[red]{p}[/]", highlight=False)
    return result


# --------------------------------------------------------------------------------------------
# Adapter export and Hub upload
# --------------------------------------------------------------------------------------------


def push_to_hub(folder: str | Path, repo_id: str, private: bool = False, commit_message: str | None = None) -> str:
    """Create (if needed) the model repo and upload the folder. Needs a token (`hf auth login` or HF_TOKEN)."""
    from huggingface_hub import HfApi

    api = HfApi()
    api.create_repo(repo_id=repo_id, repo_type="model", private=private, exist_ok=True)
    api.upload_folder(repo_id=repo_id, folder_path=str(folder), repo_type="model",
                      commit_message=commit_message or f"Upload {Path(folder).name} with echoink-lite")
    return f"https://huggingface.co/{repo_id}"


def _eval_lines(summary: dict[str, Any]) -> list[str]:
    def pct(x):
        return "n/a" if x is None else f"{100 * x:.2f}%"

    lines: list[str] = []
    results = summary.get("results")
    if isinstance(results, list) and results:
        lines.append("| model | rows | accuracy | format failures |")
        lines.append("|---|---:|---:|---:|")
        for r in results:
            acc = pct(r.get("accuracy"))
            if r.get("accuracy_spread") is not None:
                acc += f" ± {100 * r['accuracy_spread']:.2f}"
            lines.append(f"| {r.get('label', '?')} | {r.get('n_rows', '?')} | {acc} | {pct(r.get('format_failure_rate'))} |")
        if summary.get("difference_pp") is not None:
            lines.append(f"\nAdapter minus base: {summary['difference_pp']:+.2f} percentage points.")
    elif "accuracy" in summary:
        lines.append(f"Accuracy: {pct(summary['accuracy'])}" + (f" over {summary['n_rows']} rows" if "n_rows" in summary else ""))
    else:
        raise MergeError("the eval summary has no 'accuracy' (nor a 'results' list with accuracies). Fix: pass the "
                         "<predictions>.summary.json written by `echoink-lite eval`.")
    extra = [f"{k}: `{summary[k]}`" for k in ("data", "rows_evaluated", "parse_rule") if k in summary]
    if extra:
        lines.append("\n" + "; ".join(extra))
    return lines


def _model_card(config: dict[str, Any], recipe_text: str | None, recipe_name: str | None, eval_lines: list[str] | None) -> str:
    base = config.get("base_model_name_or_path") or "unknown"
    targets = config.get("target_modules")
    parts = [
        "---",
        f"base_model: {base}",
        "library_name: peft",
        "tags: [lora, qlora, grpo, qwen2.5-omni, audio-visual-question-answering, echoink-lite]",
        "---",
        "",
        "# EchoInk-lite LoRA adapter",
        "",
        f"A LoRA adapter for the thinker of **{base}** (`Qwen2_5OmniThinkerForConditionalGeneration`), trained with GRPO "
        "on audio + image multiple-choice questions (an EchoInk-R1 reproduction with QLoRA on one GPU) by echoink-lite.",
        "",
        f"- base model: `{base}`",
        f"- LoRA: r={config.get('r')}, lora_alpha={config.get('lora_alpha')}, dropout={config.get('lora_dropout')}, "
        f"rsLoRA={bool(config.get('use_rslora'))}",
        f"- target modules: `{targets}`",
        "",
        "## Use",
        "",
        "```python",
        "from peft import PeftModel",
        "from transformers import AutoConfig, Qwen2_5OmniThinkerForConditionalGeneration",
        "",
        f'cfg = AutoConfig.from_pretrained("{base}")',
        "cfg = getattr(cfg, 'thinker_config', cfg)  # full Omni checkpoints hold the thinker config inside",
        f'model = Qwen2_5OmniThinkerForConditionalGeneration.from_pretrained("{base}", config=cfg, dtype="bfloat16")',
        'model = PeftModel.from_pretrained(model, "THIS_REPO_OR_FOLDER")',
        "```",
        "",
        "Or merge it into the unquantized base: `echoink-lite merge --adapter THIS_FOLDER --out merged --dtype bf16`.",
        "",
        "## Evaluation",
        "",
    ]
    parts += eval_lines if eval_lines else ["No evaluation results were attached to this export."]
    parts += ["", "## Training recipe", ""]
    if recipe_text is not None:
        parts += [f"From `{recipe_name}`:", "", "```yaml", recipe_text.rstrip(), "```"]
    else:
        parts.append("No recipe was attached to this export.")
    return "\n".join(parts) + "\n"


def export_adapter(adapter_dir: str | Path, out_dir: str | Path, recipe_path: str | Path | None = None,
                   eval_summary: str | Path | dict | None = None, *, base: str | None = None) -> Path:
    """Write a clean PEFT folder: adapter_config.json + adapter_model.safetensors + README.md (model card
    naming the base, the recipe and the eval results when given). `base` overrides the base id recorded
    in adapter_config.json (e.g. a Hub id instead of a local path used for training)."""
    src, out = Path(adapter_dir), Path(out_dir)
    ad = read_adapter(src)  # validates: LoRA, safetensors, A/B pairs
    config = dict(ad.config)
    if base:
        config["base_model_name_or_path"] = base
    config["inference_mode"] = True
    if not config.get("base_model_name_or_path"):
        raise MergeError(f"{src}/adapter_config.json names no base model. Fix: pass --base (the Hub id of the base).")
    recipe_text = None
    if recipe_path is not None:
        rp = Path(recipe_path)
        if not rp.is_file():
            raise MergeError(f"recipe {rp} not found")
        recipe_text = rp.read_text()
    eval_lines = None
    if eval_summary is not None:
        summary = eval_summary if isinstance(eval_summary, dict) else json.loads(Path(eval_summary).read_text())
        eval_lines = _eval_lines(summary)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise MergeError(f"--out {out} exists and is not empty. Fix: pass a new folder.")
    if out.resolve() == src.resolve():
        raise MergeError("--out must not be the adapter folder")
    out.mkdir(parents=True, exist_ok=True)
    (out / "adapter_config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    shutil.copy2(src / "adapter_model.safetensors", out / "adapter_model.safetensors")
    (out / "README.md").write_text(_model_card(config, recipe_text, str(recipe_path) if recipe_path else None, eval_lines))
    return out


# --------------------------------------------------------------------------------------------
# Command line (wired into `echoink-lite merge` / `echoink-lite export` by cli.py)
# --------------------------------------------------------------------------------------------


def add_merge_arguments(parser) -> None:
    a = parser.add_argument
    a("--adapter", required=True, help="LoRA adapter folder (adapter_config.json + adapter_model.safetensors)")
    a("--out", required=True, help="new folder for the merged model (must not exist or be empty)")
    a("--base", default=None, help="unquantized base: Hub id or folder (default: base_model_name_or_path of the adapter)")
    a("--revision", default=None, help="Hub revision of the base")
    a("--format", choices=["thinker", "full"], default="thinker",
      help="thinker: thinker-only model like EchoInk-R1-7B (default); full: complete Qwen2.5-Omni with talker, token2wav, spk_dict.pt (needs a full base)")
    a("--dtype", choices=["bf16", "fp16", "fp32"], default="bf16", help="dtype of the merged thinker weights (merge math is fp32; cast once)")
    a("--no-verify", action="store_true", help="skip the verification (reload, logits vs base+adapter, weights, size)")
    a("--verify-device", default="cpu", help="device for the verification's logits check (cpu or cuda); runs in --dtype")
    a("--max-shard-size-gb", type=float, default=5.0, help="maximum size of one output shard")
    a("--report", default=None, help="also write the merge report as JSON to this file")
    a("--push-to-hub", default=None, metavar="REPO", help="upload the merged folder to this Hub model repo (after a passing verification)")
    a("--private", action="store_true", help="create the Hub repo as private")


def _print_error(console, err: Exception) -> None:
    from rich.markup import escape

    console.print(f"[bold red]error:[/] {escape(str(err))}", highlight=False)


def merge_command(args) -> int:
    """0: merged (and verified unless --no-verify); 1: verification failed; 2: refused (nothing written)."""
    from rich.console import Console

    from .modeling import ModelLoadError

    console = Console()
    try:
        report = merge_adapter(args.adapter, args.out, base=args.base, format=args.format, dtype=args.dtype,
                               verify=not args.no_verify, console=console, revision=args.revision,
                               verify_device=args.verify_device, max_shard_size=int(args.max_shard_size_gb * 1024**3))
    except (MergeError, ModelLoadError) as err:
        _print_error(console, err)
        return 2
    if args.report:
        Path(args.report).parent.mkdir(parents=True, exist_ok=True)
        Path(args.report).write_text(json.dumps(report, indent=2, default=str) + "\n")
    if report["ok"] is False:
        console.print("[bold red]verification failed[/]: the merged folder was written but does not match base + adapter; "
                      "do not publish it. Nothing was pushed.")
        return 1
    if args.push_to_hub:
        try:
            url = push_to_hub(args.out, args.push_to_hub, private=args.private)
        except Exception as err:  # network, auth: say it plainly, the merged folder stays
            console.print(f"[bold red]upload failed:[/] {type(err).__name__}: {err}", highlight=False)
            return 1
        console.print(f"uploaded to {url}")
    return 0


def add_export_arguments(parser) -> None:
    a = parser.add_argument
    a("--adapter", required=True, help="LoRA adapter folder saved by a training run")
    a("--out", required=True, help="new folder for the clean adapter + model card")
    a("--recipe", default=None, help="recipe YAML to include in the model card")
    a("--eval-summary", default=None, help="<predictions>.summary.json from `echoink-lite eval`, for the model card")
    a("--base", default=None, help="base model id to record (default: the adapter's base_model_name_or_path)")
    a("--push-to-hub", default=None, metavar="REPO", help="upload the exported folder to this Hub model repo")
    a("--private", action="store_true", help="create the Hub repo as private")


def export_command(args) -> int:
    from rich.console import Console

    console = Console()
    try:
        out = export_adapter(args.adapter, args.out, recipe_path=args.recipe, eval_summary=args.eval_summary, base=args.base)
    except (MergeError, OSError, json.JSONDecodeError) as err:
        _print_error(console, err)
        return 2
    console.print(f"exported the adapter to {out} (adapter_config.json, adapter_model.safetensors, README.md)", highlight=False)
    if args.push_to_hub:
        try:
            url = push_to_hub(out, args.push_to_hub, private=args.private)
        except Exception as err:
            console.print(f"[bold red]upload failed:[/] {type(err).__name__}: {err}", highlight=False)
            return 1
        console.print(f"uploaded to {url}")
    return 0
