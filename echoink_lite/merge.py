"""Merge a trained QLoRA adapter into the unquantized base weights: ``echoink-lite merge``.

``merge_adapter(adapter, out, base=None, format="thinker", dtype="bf16")`` writes a checkpoint that the
standard transformers classes load, then (by default) verifies it with ``merge_verification.verify_merge``.
Reading the base checkpoint (config, shards, tensor headers, key names) lives in ``merge_base``, the list of
tensors the output holds in ``merge_plan``. Exporting the adapter itself with a model card, and uploading,
live in ``export``.

Why it is done this way:

- **Never into 4-bit weights.** Merging into the NF4 model that was trained re-quantizes the sum; PEFT
  itself warns "Merge lora module to 4-bit linear may get different generations due to rounding errors"
  (peft/tuners/lora/bnb.py). The adapter is merged into the base checkpoint's own (bf16) weights instead:
  for every LoRA target ``W' = W + s * (B @ A)`` with ``s = alpha / r`` (``alpha / sqrt(r)`` with rsLoRA),
  computed in fp32 from the stored weights and cast once to the output dtype. That is exact up to the
  single final rounding.
- **No GPU, bounded RAM.** No model is instantiated for the merge: the base safetensors shards are read
  tensor by tensor (``safe_open``, memory-mapped) and written as output shards of at most
  ``max_shard_size`` bytes, so peak memory is about one output shard plus the adapter, not the model.
  Only safetensors are read (a ``.bin`` is a pickle and is refused).
- **Right size.** Every floating tensor of the thinker is cast to the output dtype (a bf16 merge of a bf16
  base has the base's size, not the twice-as-large fp32 file a careless merge writes); the verification
  measures it.
- **Thinker format** (default): a thinker-only model (``model_type qwen2_5_omni_thinker``) with the key
  names transformers itself writes for ``Qwen2_5OmniThinkerForConditionalGeneration`` (``model.layers.N``,
  ``audio_tower.``, ``visual.``, ``lm_head``), like the released EchoInk-R1-7B. From a full Omni base the
  ``thinker.*`` tensors are taken and the prefix dropped; the config is the base's ``thinker_config``.
- **Full format**: a complete Qwen2.5-Omni (needs a full base): thinker merged, ``talker.*`` and
  ``token2wav.*`` copied **bit for bit in their stored dtype** (they are not trained here, so casting them
  could only lose information), and ``spk_dict.pt`` copied: ``Qwen2_5OmniForConditionalGeneration``'s
  ``from_pretrained`` requires that file and ``save_pretrained`` does not write it (transformers
  models/qwen2_5_omni/modeling_qwen2_5_omni.py), so other tools' saved Omni models fail to load
  (HarryHsing/EchoInk issue 1, hiyouga/LLaMA-Factory issue 7821).
- **Refuse early.** ``adapters.check_adapter_fits`` checks the adapter's LoRA shapes against the base
  config, then against the base shard headers, before anything is written; ``--out`` inside the adapter
  or base folder, or a non-empty one, is refused.
- **Never a half model at --out.** The shards are written into a uniquely named hidden sibling folder that
  is renamed to ``--out`` at the end; a failed write removes it and names the path.
"""

from __future__ import annotations

import errno
import json
import re
import shutil
import time
from pathlib import Path
from typing import Any

import torch

from .adapter_tensors import Adapter, LoraModule, read_adapter
from .adapters import BaseLayout, check_adapter_fits
from .merge_base import (
    Base,
    MergeError,
    base_layout,
    download_base,
    is_full_omni,
    lora_targets,
    read_base_config,
    read_base_headers,
    weight_files,
)
from .merge_plan import DTYPE_CONFIG_NAMES, DTYPES, PlannedTensor, plan_tensors

_ALIASES = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32", "half": "fp16", "float": "fp32"}

# Processor / tokenizer files copied to the merged folder when present.
_PROCESSOR_FILES = (
    "tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt", "special_tokens_map.json",
    "added_tokens.json", "chat_template.jinja", "chat_template.json", "preprocessor_config.json",
    "processor_config.json", "video_preprocessor_config.json", "tokenizer.model",
)


# --------------------------------------------------------------------------------------------
# The merge
# --------------------------------------------------------------------------------------------


def merged_weight(weight: torch.Tensor, lm: LoraModule, dtype: torch.dtype) -> torch.Tensor:
    """W + s * B @ A in fp32 from the stored base weight, cast once to `dtype`."""
    return (weight.float() + lm.delta()).to(dtype)


def _shard_groups(plan: list[PlannedTensor], max_shard_bytes: int) -> list[list[PlannedTensor]]:
    groups: list[list[PlannedTensor]] = [[]]
    size = 0
    for item in plan:
        if groups[-1] and size + item.nbytes > max_shard_bytes:
            groups.append([])
            size = 0
        groups[-1].append(item)
        size += item.nbytes
    return [g for g in groups if g]


def _write_weights(base: Base, plan: list[PlannedTensor], adapter: Adapter, out: Path, max_shard_bytes: int, progress=None) -> list[str]:
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
    """Refuse an --out that exists with content, or that lies inside the adapter or the base folder."""
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise MergeError(f"--out {out} exists and is not empty. Fix: pass a new folder (nothing is overwritten).")
    target = out.expanduser().resolve()
    for other, what in ((adapter_dir, "adapter"), (base_path, "base")):
        if other is None:
            continue
        folder = Path(other).expanduser().resolve()
        if target == folder or folder in target.parents:
            raise MergeError(f"--out {out} is inside the {what} folder {other}: the merged model (about 16 GB for the 7B) "
                             f"would be written into it. Fix: pass a folder outside it, e.g. {folder.parent / 'merged'}.")


def _new_partial_folder(out: Path) -> Path:
    """safe_output.new_partial_folder, its refusal as a MergeError."""
    from .safe_output import OutputError, new_partial_folder

    try:
        return new_partial_folder(out, "--out")
    except OutputError as err:
        raise MergeError(str(err)) from None


def _safetensors_io_error(err: BaseException) -> OSError | None:
    """The OSError behind a SafetensorError raised by a failed write ("I/O error: No space left on device (os
    error 28)"), or None for any other error."""
    from safetensors import SafetensorError

    text = str(err)
    if not isinstance(err, SafetensorError) or "I/O error" not in text:
        return None
    found = re.search(r"os error (\d+)\)", text)
    code = int(found.group(1)) if found else errno.EIO
    return OSError(code, text.split("I/O error: ")[-1].split(" (os error")[0])


def _write_error(err: OSError, out: Path) -> MergeError:
    where = err.filename or out
    if err.errno == errno.ENOSPC:
        return MergeError(f"no space left on device while writing {where}; nothing was left at --out {out}. "
                          "Fix: free space there or pass --out on a larger disk.")
    return MergeError(f"cannot write the merged model to {out}: {err.strerror or err} ({where}); nothing was left at --out. "
                      "Fix: pass a folder you can write to.")


def merge_adapter(adapter: str | Path, out: str | Path, base: str | None = None, format: str = "thinker", dtype: str = "bf16",
                  verify: bool = True, console=None, *, revision: str | None = None, verify_device: str = "cpu",
                  max_shard_size: int = 5 * 1024**3, verify_prompts: int = 2) -> dict[str, Any]:
    """Merge `adapter` into the unquantized `base` (default: the base its adapter_config.json names) and
    write a checkpoint to `out`; returns a report dict (with the verification under "verification" when
    `verify`). Raises MergeError or adapters.AdapterError, before writing anything, when the inputs do not
    fit together or `out` is not a new folder outside the adapter and the base."""
    from rich.console import Console

    from .merge_verification import verify_merge

    console = console or Console()
    fmt, dtype_key = _resolve_format_dtype(format, dtype)
    adapter_dir, out = Path(adapter), Path(out)
    t0 = time.monotonic()

    ad = read_adapter(adapter_dir)
    base_name = base or ad.base
    if not base_name:
        raise MergeError(f"{adapter_dir}/adapter_config.json names no base_model_name_or_path. Fix: pass --base (Hub id or folder).")
    if not base:
        console.print(f"base: {base_name} (from {adapter_dir}/adapter_config.json; --base overrides)", highlight=False)
    fix = "pass --base the base model the adapter was trained on"

    # 1. Cheap checks on the config alone (for a Hub id nothing but config.json is downloaded yet).
    local, config = read_base_config(base_name, revision)
    is_full = is_full_omni(base_name, config)
    if fmt == "full" and not is_full:
        raise MergeError(f"--format full needs a full Qwen2.5-Omni base (thinker + talker + token2wav + spk_dict.pt), but "
                         f"'{base_name}' is thinker-only (model_type qwen2_5_omni_thinker). Fix: pass --base the full "
                         "checkpoint the thinker came from (e.g. Qwen/Qwen2.5-Omni-7B), or use --format thinker.")
    thinker_config = config["thinker_config"] if is_full else config
    check_adapter_fits(BaseLayout.from_config(thinker_config, base_name), adapter_dir, fix=fix)
    _check_out(out, adapter_dir, local)

    # 2. Shard headers: exact shapes and dtypes of every base tensor.
    path = local or download_base(base_name, revision)
    b = Base(base_name, path, config, is_full, weight_files(path))
    read_base_headers(b)
    check_adapter_fits(base_layout(b), adapter_dir, fix=fix)
    mapping = lora_targets(ad, b)
    if fmt == "full" and not any(k.startswith(("talker.", "token2wav.")) for k in b.shapes):
        raise MergeError(f"--format full: base '{base_name}' has no talker.* / token2wav.* weights. Fix: use --format thinker.")
    plan = plan_tensors(b, fmt, DTYPES[dtype_key], mapping)

    # 3. Write into a new hidden sibling folder, renamed to --out at the end: an interrupted merge leaves no
    #    half model at --out, and no folder of the user's is ever deleted.
    tmp = _new_partial_folder(out)
    console.print(f"merging {len(mapping)} LoRA modules of {adapter_dir} into '{base_name}' "
                  f"({'full' if is_full else 'thinker-only'} base) -> {fmt} format, {DTYPE_CONFIG_NAMES[dtype_key]}", highlight=False)
    from rich.progress import Progress

    try:
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
    except OSError as err:
        shutil.rmtree(tmp, ignore_errors=True)
        raise _write_error(err, out) from None
    except BaseException as err:
        shutil.rmtree(tmp, ignore_errors=True)
        io_error = _safetensors_io_error(err)
        if io_error is not None:  # safetensors reports a failed write (a full disk) as SafetensorError
            raise _write_error(io_error, out) from None
        raise

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
