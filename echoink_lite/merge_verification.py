"""Check a merged checkpoint against the base + adapter it came from: the verification of ``merge``.

``verify_merge`` runs three independent checks and prints them as one table:

- **weights**: every output tensor is read back; LoRA targets must equal ``cast(W + s * B @ A)``
  recomputed here in fp64 (within one rounding to the output dtype) and differ from ``cast(W)``; every
  other tensor must equal the base after the dtype cast (talker / token2wav bit for bit).
- **size on disk**: the bytes written must match the base's parameter count at the output dtype within
  5% (an accidental fp32 copy of a bf16 model is 2x).
- **reload + logits**: the folder is loaded with the standard transformers classes (no missing,
  unexpected or mismatched keys) and its logits on fixed synthetic audio + image prompts are compared
  with the base + adapter unmerged (PEFT), same dtype and device.

Why separate checks: the merge writes files by hand (no model is instantiated), so each way it could go
wrong (a missing scale, a skipped layer, a wrong key name, a wrong dtype) must show in a check that does
not share its code.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch

from .adapter_tensors import Adapter
from .merge_base import Base, thinker_module_name, torch_dtype_of
from .merge_plan import DTYPE_CONFIG_NAMES, DTYPES, plan_tensors

# Logit tolerance of the verification: max |merged - (base + adapter)| <= atol + rtol * max |reference|.
# fp32: both sides compute the same function up to summation order. bf16/fp16: the merged model holds
# round(W + dW) while the reference holds round(W) plus an unrounded LoRA path, so they differ by about one
# rounding of every weight, accumulated over the layers; 5% (bf16, 8-bit mantissa) / 2% (fp16, 11-bit) of
# the logit range is well above that noise and far below a wrong merge (a missing scale, a missing layer).
LOGIT_TOLERANCE = {"fp32": (1e-4, 1e-5), "fp16": (0.02, 0.02), "bf16": (0.05, 0.05)}


def _out_index(out: Path) -> dict[str, str]:
    """{tensor key -> shard file} of a written checkpoint."""
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
    plan = plan_tensors(base, fmt, dtype, mapping)
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
        stored = torch_dtype_of(st_dtype)
        n = math.prod(shape)
        params += n
        expected += n * (dtype.itemsize if thinker and stored.is_floating_point else stored.itemsize)
    written = 0
    files = sorted(set(_out_index(out).values()))
    for name in files:
        with safe_open(str(out / name), framework="pt") as f:
            for key in f.keys():
                s = f.get_slice(key)
                written += math.prod(s.get_shape()) * torch_dtype_of(str(s.get_dtype())).itemsize
    file_bytes = sum((out / n).stat().st_size for n in files)
    ratio = written / expected if expected else float("nan")
    return {"parameters": params, "expected_tensor_bytes": expected, "tensor_bytes": written, "file_bytes": file_bytes,
            "ratio": round(ratio, 4), "ok": abs(ratio - 1.0) <= 0.05}


def _verification_inputs(processor, n: int) -> list[dict[str, torch.Tensor]]:
    """Fixed synthetic prompts (coloured noisy image + tone), encoded with the kit's prompt path."""
    import numpy as np
    from PIL import Image

    from .answer_protocol import build_prompt_text
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

    from transformers import AutoConfig, Qwen2_5OmniForConditionalGeneration, Qwen2_5OmniThinkerForConditionalGeneration

    from .adapters import load_adapter
    from .modeling import load_processor, load_thinker

    dtype = DTYPES[dtype_key]
    dname = DTYPE_CONFIG_NAMES[dtype_key]
    processor = load_processor(str(out))  # the processor files copied into the merged folder
    batches = _verification_inputs(processor, n_prompts)

    ref_model = load_thinker(str(base.path), dtype=dname, quantization=None, device=device)
    ref_model = load_adapter(ref_model, adapter.path).eval()
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
    """Run the three checks on the merged folder `out`, print a table, and return
    {"weights", "size", "logits", "ok"}; `mapping` is merge_base.lora_targets(adapter, base)."""
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
