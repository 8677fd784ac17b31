"""What a LoRA adapter folder holds, where it came from, and whether it fits a base model.

An adapter folder is what PEFT's ``save_pretrained`` writes: ``adapter_config.json`` and
``adapter_model.safetensors`` with keys ``base_model.model.<module>.lora_A.weight`` / ``.lora_B.weight``.
A training run keeps it at ``RUN/adapter`` (final) and ``RUN/checkpoints/step-N/adapter``, next to
``RUN/recipe.yaml``.

Why the kit checks an adapter against its base itself, before PEFT loads it: ``PeftModel.from_pretrained``
(peft 0.21) loads an adapter trained on a base with more layers without a word (the LoRA weights of the
layers the base lacks are dropped as unexpected keys), leaves the LoRA of layers the adapter lacks at zero,
and reports a width mismatch as a size-mismatch traceback from torch's ``load_state_dict``.
``check_adapter_fits`` compares the adapter's LoRA shapes (read from the safetensors header, no tensor data)
with the base's linear layers and raises one line that names the adapter folder, the base and the fix.
Every command that loads an adapter calls it: ``eval``, ``infer``, ``export``, ``merge`` and training's
resume.

Every reader also refuses an adapter that holds NaN or inf (``nonfinite_problem``): it would merge, evaluate or
resume into NaN logits with exit 0. ``load_adapter`` checks the weights PEFT loaded, merge and export the tensors
they read whole (adapter_tensors.py), and resume the checkpoint's file before the run writes anything.

Also here, because they are facts about an adapter folder: the base it names (``base_model_name_or_path``),
the base quantization it was trained with (from the run's ``recipe.yaml``), and a hash of its content (the
eval cache key: a retrained adapter at the same path must not reuse old predictions).
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch

from .modeling import ModelLoadError

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
RECIPE_FILE = "recipe.yaml"  # written by `train` into the run folder

LORA_KEY = re.compile(r"^base_model\.model\.(?P<module>.+)\.lora_(?P<ab>[AB])(?:\.(?P<name>[^.]+))?\.weight$")
_LLM_LINEAR = re.compile(r"^model\.language_model\.layers\.(?P<layer>\d+)\.(?P<block>self_attn|mlp)\.(?P<proj>[^.]+)$")
_LLM_PROJECTIONS = {"self_attn": ("q_proj", "k_proj", "v_proj", "o_proj"), "mlp": ("gate_proj", "up_proj", "down_proj")}


class AdapterError(ModelLoadError):
    """An adapter folder that cannot be used (unreadable, or made for another base); the message says why
    and what to do."""


# --------------------------------------------------------------------------------------------
# Reading an adapter folder
# --------------------------------------------------------------------------------------------


def read_adapter_config(adapter_dir: str | Path) -> dict[str, Any]:
    """adapter_config.json of a PEFT adapter folder that also holds safetensors weights (pickles are refused)."""
    path = Path(adapter_dir)
    if not path.exists():
        raise AdapterError(f"adapter folder {path} does not exist. Fix: pass the folder a training run saved its adapter to "
                           "(RUN/adapter or RUN/checkpoints/step-N/adapter).")
    if not path.is_dir():
        raise AdapterError(f"adapter {path} is a file, not a folder. Fix: pass the folder that holds {ADAPTER_CONFIG}.")
    cfg_file = path / ADAPTER_CONFIG
    if not cfg_file.is_file():
        hint = (" It holds a model (config.json): pass it as --merged (eval, infer) or as the base."
                if (path / "config.json").is_file() else "")
        raise AdapterError(f"{path} holds no {ADAPTER_CONFIG}, so it is not a LoRA adapter.{hint} Fix: pass the folder a "
                           "training run saved its adapter to (RUN/adapter or RUN/checkpoints/step-N/adapter).")
    try:
        config = json.loads(cfg_file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise AdapterError(f"{cfg_file} is not valid JSON ({err}). Fix: restore the file from the run folder.") from None
    except RecursionError:
        raise AdapterError(f"{cfg_file} is nested too deeply to read. Fix: restore the file from the run folder.") from None
    if not isinstance(config, dict):
        raise AdapterError(f"{cfg_file} holds no JSON object. Fix: restore the file from the run folder.")
    if not (path / ADAPTER_WEIGHTS).is_file():
        if (path / "adapter_model.bin").is_file():
            raise AdapterError(f"{path}: adapter_model.bin is a pickle and is not read; echoink-lite reads safetensors only. "
                               "Fix: re-save the adapter with save_pretrained(..., safe_serialization=True).")
        raise AdapterError(f"{path} holds no {ADAPTER_WEIGHTS}. Fix: pass a complete adapter folder.")
    return config


def adapter_base_model(adapter_dir: str | Path) -> str | None:
    """The base the adapter says it was trained on (`base_model_name_or_path`), or None."""
    return read_adapter_config(adapter_dir).get("base_model_name_or_path") or None


@dataclass(frozen=True)
class LoraShape:
    out_features: int  # rows of lora_B
    in_features: int  # columns of lora_A
    rank: int


def lora_shapes(adapter_dir: str | Path) -> dict[str, LoraShape]:
    """{module name -> LoRA shape} from the safetensors header (no tensor data is read)."""
    from safetensors import safe_open

    path = Path(adapter_dir)
    config = read_adapter_config(path)
    weights = path / ADAPTER_WEIGHTS
    parts: dict[str, dict[str, list[int]]] = {}
    other: list[str] = []
    try:
        with safe_open(str(weights), framework="pt") as f:
            for key in f.keys():
                m = LORA_KEY.match(key)
                if m is None:
                    other.append(key)
                else:
                    parts.setdefault(m["module"], {})[m["ab"]] = list(f.get_slice(key).get_shape())
    except Exception as err:  # a truncated or corrupt header: safetensors raises its own error types
        raise AdapterError(f"{weights} cannot be read ({type(err).__name__}: {err}). Fix: restore the adapter from a "
                           "complete checkpoint.") from None
    if other:
        raise AdapterError(f"{weights} holds tensors that are not LoRA A/B weights (e.g. '{other[0]}'); echoink-lite "
                           "adapters are plain LoRA. Fix: pass an adapter trained by echoink-lite.")
    if not parts:
        raise AdapterError(f"{weights} holds no LoRA weights. Fix: pass an adapter saved by a training run.")
    r0, _, rank_pattern, _ = lora_settings(config, path)
    shapes: dict[str, LoraShape] = {}
    for module, ab in sorted(parts.items()):
        if set(ab) != {"A", "B"}:
            raise AdapterError(f"{weights}: module '{module}' has lora_{''.join(ab)} but not both lora_A and lora_B. "
                               "Fix: restore the adapter from a complete checkpoint.")
        a, b = ab["A"], ab["B"]
        if len(a) != 2 or len(b) != 2 or a[0] != b[1]:
            raise AdapterError(f"{weights}: module '{module}': lora_A {a} and lora_B {b} do not form B @ A.")
        shapes[module] = LoraShape(out_features=b[0], in_features=a[1], rank=a[0])
        # PEFT builds each LoRA layer with the config's rank, then fails in load_state_dict with a size-mismatch
        # traceback per tensor; every command that reads an adapter comes through here first.
        r = pattern_value(rank_pattern, module, r0)
        if a[0] != r:
            raise AdapterError(f"{weights}: module '{module}' has rank {a[0]} but {ADAPTER_CONFIG} says r={r}. Fix: "
                               f"restore {ADAPTER_CONFIG} from the run that saved these weights (its r must be {a[0]}).")
    return shapes


def lora_settings(config: dict[str, Any], path: Path) -> tuple[int, float, dict[str, Any], dict[str, Any]]:
    """(r, lora_alpha, rank_pattern, alpha_pattern) of an adapter_config.json, checked to be numbers."""
    r0, alpha0 = config.get("r", 8), config.get("lora_alpha", 8)
    rank_pattern, alpha_pattern = config.get("rank_pattern") or {}, config.get("alpha_pattern") or {}
    ranks_ok = all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in [r0, *dict(rank_pattern).values()]) \
        if isinstance(rank_pattern, dict) else False
    alphas_ok = all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
                    for v in [alpha0, *dict(alpha_pattern).values()]) if isinstance(alpha_pattern, dict) else False
    if not (ranks_ok and alphas_ok):
        raise AdapterError(f"{path / ADAPTER_CONFIG}: r={r0!r}, lora_alpha={alpha0!r}, rank_pattern={rank_pattern!r} or "
                           f"alpha_pattern={alpha_pattern!r} is not a valid LoRA setting (ranks are whole numbers >= 1, "
                           "alphas finite numbers). Fix: restore the file from the run folder.")
    return r0, float(alpha0), rank_pattern, alpha_pattern


def adapter_content_hash(adapter_dir: str | Path) -> str:
    """SHA-256 (hex) of adapter_config.json and the weights: the same path retrained gives another hash."""
    path = Path(adapter_dir)
    read_adapter_config(path)
    digest = hashlib.sha256()
    for name in (ADAPTER_CONFIG, ADAPTER_WEIGHTS):
        digest.update(name.encode() + b"\0")
        with (path / name).open("rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


# --------------------------------------------------------------------------------------------
# The recipe the adapter was trained with
# --------------------------------------------------------------------------------------------


def training_recipe_file(adapter_dir: str | Path) -> Path | None:
    """RUN/recipe.yaml for RUN/adapter or RUN/checkpoints/step-N/adapter, when it exists."""
    path = Path(adapter_dir).expanduser().resolve()
    candidates = [path.parent / RECIPE_FILE]
    if path.parent.parent.name == "checkpoints":
        candidates.append(path.parent.parent.parent / RECIPE_FILE)
    return next((c for c in candidates if c.is_file()), None)


def training_quantization(adapter_dir: str | Path):
    """(quantization section of the run's recipe, recipe file), or (None, None) without a recipe beside
    the adapter. Only the `quantization` section is read and validated, so recipes from other kit
    versions still work."""
    import yaml
    from pydantic import ValidationError

    from .recipe import QuantizationSection

    recipe_file = training_recipe_file(adapter_dir)
    if recipe_file is None:
        return None, None
    try:
        data = yaml.safe_load(recipe_file.read_text(encoding="utf-8")) or {}
        section = QuantizationSection(**(data.get("quantization") or {}))
    except (yaml.YAMLError, UnicodeDecodeError, ValidationError, TypeError, AttributeError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise AdapterError(f"{recipe_file}: cannot read its quantization section ({first}). Fix: restore the file, or "
                           "choose the base quantization yourself with --quantization nf4 or none.") from None
    return section, recipe_file


# --------------------------------------------------------------------------------------------
# The base's linear layers
# --------------------------------------------------------------------------------------------


def text_dims(thinker_config: dict[str, Any]) -> dict[str, int]:
    """Sizes of the language model of a thinker config (as a dict; `text_config` or the top level)."""
    t = thinker_config.get("text_config") or thinker_config
    hidden, heads = int(t["hidden_size"]), int(t["num_attention_heads"])
    head_dim = int(t.get("head_dim") or hidden // heads)
    return dict(hidden_size=hidden, intermediate_size=int(t["intermediate_size"]), num_hidden_layers=int(t["num_hidden_layers"]),
                num_attention_heads=heads, num_key_value_heads=int(t.get("num_key_value_heads") or heads), head_dim=head_dim)


def _projection_shape(proj: str, d: dict[str, int]) -> tuple[int, int] | None:
    h, i, hd = d["hidden_size"], d["intermediate_size"], d["head_dim"]
    return {
        "q_proj": (d["num_attention_heads"] * hd, h), "k_proj": (d["num_key_value_heads"] * hd, h),
        "v_proj": (d["num_key_value_heads"] * hd, h), "o_proj": (h, d["num_attention_heads"] * hd),
        "gate_proj": (i, h), "up_proj": (i, h), "down_proj": (h, i),
    }.get(proj)


@dataclass
class BaseLayout:
    """The linear layers a LoRA adapter can attach to, as the thinker names its modules."""

    name: str  # how the base was given (Hub id or folder), for messages
    linears: dict[str, tuple[int, int]]  # module name -> (out_features, in_features)
    dims: dict[str, int]  # text_dims of its config
    complete: bool  # False: built from the config alone, so only the language model's layers are known

    @classmethod
    def from_config(cls, thinker_config: dict[str, Any], name: str) -> "BaseLayout":
        """The language model's projections, from the config alone (nothing else is downloaded). A full
        Qwen2.5-Omni config is read through its `thinker_config`."""
        thinker_config = thinker_config.get("thinker_config") or thinker_config
        dims = text_dims(thinker_config)
        linears = {}
        for layer in range(dims["num_hidden_layers"]):
            for block, projs in _LLM_PROJECTIONS.items():
                for proj in projs:
                    linears[f"model.language_model.layers.{layer}.{block}.{proj}"] = _projection_shape(proj, dims)
        return cls(name, linears, dims, complete=False)

    @classmethod
    def from_model(cls, model, name: str | None = None) -> "BaseLayout":
        """Every linear layer of a loaded thinker (4-bit or not, with or without LoRA already attached)."""
        inner = model.get_base_model() if hasattr(model, "get_base_model") else model
        linears = {}
        for module_name, module in inner.named_modules():
            if ".lora_" in module_name or module_name.endswith(".base_layer") or ".base_layer." in module_name:
                continue  # PEFT's own sub-modules of a wrapped layer
            out_f, in_f = getattr(module, "out_features", None), getattr(module, "in_features", None)
            if isinstance(out_f, int) and isinstance(in_f, int):
                linears[module_name] = (out_f, in_f)
        config = inner.config.to_dict()
        name = name or getattr(inner.config, "_name_or_path", None) or getattr(inner, "name_or_path", None) or "the loaded model"
        return cls(str(name), linears, text_dims(config), complete=True)


# --------------------------------------------------------------------------------------------
# Does the adapter fit?
# --------------------------------------------------------------------------------------------


def _targets(config: dict[str, Any]) -> SimpleNamespace:
    """The fields of adapter_config.json that PEFT's target matching reads."""
    return SimpleNamespace(**{k: config.get(k) for k in (
        "target_modules", "exclude_modules", "modules_to_save", "target_parameters", "layers_to_transform", "layers_pattern")})


def _selected_by_targets(config: dict[str, Any], module: str) -> bool:
    # PEFT's own rule for which modules an adapter config attaches to.
    from peft.tuners.tuners_utils import check_target_module_exists

    return bool(check_target_module_exists(_targets(config), module))


def _known(layout: BaseLayout, module: str) -> bool:
    """Can the layout say whether `module` exists? (A config-only layout knows the language model only.)"""
    return layout.complete or _LLM_LINEAR.match(module) is not None


def _layer_span(layers: list[int]) -> str:
    layers = sorted(set(layers))
    return f"layer {layers[0]}" if len(layers) == 1 else f"layers {layers[0]}-{layers[-1]}"


def _implied_dims(shapes: dict[str, LoraShape]) -> dict[str, int]:
    """Sizes the adapter's LoRA shapes reveal about the model it was trained on (for the message)."""
    out: dict[str, int] = {}
    layers = []
    for module, s in shapes.items():
        m = _LLM_LINEAR.match(module)
        if m is None:
            continue
        layers.append(int(m["layer"]))
        if m["proj"] in ("q_proj", "gate_proj", "up_proj"):
            out.setdefault("hidden_size", s.in_features)
        elif m["proj"] == "down_proj":
            out.setdefault("intermediate_size", s.in_features)
        elif m["proj"] in ("k_proj", "v_proj"):
            out.setdefault("kv_width", s.out_features)
    if layers:
        out["num_hidden_layers"] = max(layers) + 1
    order = ("hidden_size", "intermediate_size", "kv_width", "num_hidden_layers")
    return {k: out[k] for k in order if k in out}


def fit_problems(shapes: dict[str, LoraShape], config: dict[str, Any], layout: BaseLayout) -> list[str]:
    """What does not fit, grouped, most telling first; empty when the adapter fits the base exactly."""
    beyond: list[int] = []
    absent: list[str] = []
    resized: list[str] = []
    for module, s in shapes.items():
        if not _known(layout, module):
            continue
        m = _LLM_LINEAR.match(module)
        if module not in layout.linears:
            if m is not None and int(m["layer"]) >= layout.dims["num_hidden_layers"]:
                beyond.append(int(m["layer"]))
            else:
                absent.append(module)
            continue
        want = layout.linears[module]
        if (s.out_features, s.in_features) != want:
            resized.append(f"{module}: LoRA update [{s.out_features}, {s.in_features}], base layer [{want[0]}, {want[1]}]")
    missing = [m for m in layout.linears if m not in shapes and _selected_by_targets(config, m)]

    problems = []
    if beyond:
        problems.append(f"it has LoRA weights for {_layer_span(beyond)}, which the base does not have "
                        f"(the base has {layout.dims['num_hidden_layers']} layers)")
    if resized:
        problems.append(f"{len(resized)} LoRA modules have other sizes than the base (e.g. {resized[0]})")
    if absent:
        problems.append(f"{len(absent)} LoRA modules are not in the base (e.g. {absent[0]})")
    if missing:
        layers = [int(m["layer"]) for name in missing if (m := _LLM_LINEAR.match(name))]
        where = f" ({_layer_span(layers)})" if layers and len(layers) == len(missing) else ""
        problems.append(f"it has no LoRA weights for {len(missing)} base modules its target_modules select{where}, "
                        f"e.g. {missing[0]}")
    if layout.complete and config.get("target_modules") and not any(_selected_by_targets(config, m) for m in layout.linears):
        problems.append(f"its target_modules {config['target_modules']!r} select no module of the base")
    return problems


def check_adapter_fits(base, adapter_dir: str | Path, *, base_name: str | None = None, fix: str | None = None) -> None:
    """Raise AdapterError (one line) unless the adapter in `adapter_dir` fits `base` exactly.

    `base`: a loaded thinker (or a PeftModel around one), a `BaseLayout`, or a thinker config (a
    transformers config or its dict). Every LoRA module of the adapter must exist in the base with the same
    shape (no unexpected keys), and every base module that the adapter's target_modules select must have
    LoRA weights in the adapter (no missing keys). `fix` replaces the default advice (which names the base
    recorded in adapter_config.json); `base_name` names the base in the message.
    """
    if isinstance(base, BaseLayout):
        layout = base
    elif isinstance(base, dict):
        layout = BaseLayout.from_config(base, base_name or base.get("_name_or_path") or "the base")
    elif hasattr(base, "to_dict") and not isinstance(base, torch.nn.Module):
        layout = BaseLayout.from_config(base.to_dict(), base_name or getattr(base, "_name_or_path", "") or "the base")
    else:
        layout = BaseLayout.from_model(base, base_name)
    if base_name:
        layout.name = base_name
    shapes = lora_shapes(adapter_dir)
    config = read_adapter_config(adapter_dir)
    problems = fit_problems(shapes, config, layout)
    if not problems:
        return
    sizes = ""
    implied = _implied_dims(shapes)
    if implied:
        d = layout.dims
        base_has = dict(hidden_size=d["hidden_size"], intermediate_size=d["intermediate_size"],
                        kv_width=d["num_key_value_heads"] * d["head_dim"], num_hidden_layers=d["num_hidden_layers"])
        implied_text = [f"{k}={v}" for k, v in implied.items() if k != "num_hidden_layers"]
        if "num_hidden_layers" in implied:
            implied_text.append(f"num_hidden_layers>={implied['num_hidden_layers']}")
        sizes = f" The adapter implies {', '.join(implied_text)}; the base has {', '.join(f'{k}={v}' for k, v in base_has.items())}."
    recorded = config.get("base_model_name_or_path")
    if fix is None:
        fix = "use the base model the adapter was trained on" + (f" (its {ADAPTER_CONFIG} names '{recorded}')" if recorded else "")
    elif recorded and recorded not in fix:
        fix += f" (its {ADAPTER_CONFIG} names '{recorded}')"
    raise AdapterError(f"adapter {adapter_dir} does not fit the base '{layout.name}': {'; '.join(problems)}.{sizes} Fix: {fix}.")


EARLIER_ADAPTER_FIX = ("use an earlier checkpoint's adapter (RUN/checkpoints/step-*/adapter), and lower optim.learning_rate "
                      "for a new run")


def nonfinite_problem(tensors, where, fix: str = EARLIER_ADAPTER_FIX) -> str | None:
    """One line naming the first LoRA tensor of `tensors` (name -> tensor) that holds NaN or inf, else None. A
    diverged run's adapter merges, evaluates and resumes into NaN logits, so every reader refuses it first."""
    for name, tensor in tensors:
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            bad = int((~torch.isfinite(tensor)).sum())
            return (f"adapter {where}: {name} holds {bad} NaN or infinite value(s) of {tensor.numel()}, so every logit "
                    f"with it is NaN (the run that wrote it diverged). Fix: {fix}.")
    return None


def check_adapter_finite(adapter_dir: str | Path, fix: str = EARLIER_ADAPTER_FIX) -> None:
    """AdapterError when adapter_model.safetensors holds NaN or inf (read one tensor at a time)."""
    from safetensors import safe_open

    with safe_open(str(Path(adapter_dir) / ADAPTER_WEIGHTS), framework="pt") as f:
        problem = nonfinite_problem(((key, f.get_tensor(key)) for key in f.keys()), adapter_dir, fix)
    if problem:
        raise AdapterError(problem)


def pattern_value(patterns: dict[str, Any], module: str, default):
    # PEFT's rule (peft.utils.other.get_pattern_key): a pattern matches the end of the module name.
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------
def load_adapter(model, adapter_dir: str | Path, trainable: bool = False, *, base_name: str | None = None, fix: str | None = None):
    """Attach a saved PEFT adapter to a loaded thinker, after checking that it fits the thinker exactly
    (`check_adapter_fits`: PEFT itself drops LoRA weights for layers the base lacks without a
    word). Raises AdapterError, a ModelLoadError, with one line naming the folder, base and fix."""
    from peft import PeftModel

    from .modeling import peft_reading_deprecated_property

    check_adapter_fits(model, adapter_dir, base_name=base_name, fix=fix)
    with peft_reading_deprecated_property():
        loaded = PeftModel.from_pretrained(model, str(adapter_dir), is_trainable=trainable)
    # The weights PEFT just loaded, not a second read of the file; one host sync when they are all finite.
    lora = [(name, p) for name, p in loaded.named_parameters() if "lora_" in name]
    if lora and not bool(torch.stack([torch.isfinite(p).all() for _, p in lora]).all()):
        raise AdapterError(nonfinite_problem(((name, p.detach()) for name, p in lora), adapter_dir))
    return loaded
