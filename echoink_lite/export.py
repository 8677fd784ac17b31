"""Export a trained adapter as a clean, documented PEFT folder, and publish folders to the Hub:
``echoink-lite export`` (and ``merge --push-to-hub``).

``export_adapter`` writes ``adapter_config.json`` + ``adapter_model.safetensors`` + ``README.md`` (a model
card naming the base, the LoRA settings, the recipe and the eval results when given) and nothing else a
training folder holds (optimizer state, predictions). Before writing, the adapter is checked against the
base it will be published for (``adapters.check_adapter_fits``): a card that names the wrong base would
mislead every user of the upload. The card names the evaluation split by its name, never by a local path.

``push_to_hub`` is a thin call to ``huggingface_hub.HfApi`` (create_repo + upload_folder).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from .adapter_tensors import read_adapter
from .adapters import ADAPTER_CONFIG, ADAPTER_WEIGHTS, check_adapter_fits
from .merge_base import MergeError, base_layout_for


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
    from .eval_report import split_name

    split = summary.get("split") or (split_name(summary["data"]) if summary.get("data") else None)
    extra = [f"split: `{split}`"] if split else []  # the split's name: a local path means nothing to readers
    protocol = summary.get("protocol") if isinstance(summary.get("protocol"), dict) else {}
    if protocol.get("name"):  # which evaluation produced the number (eval --protocol)
        extra.append(f"protocol: `{protocol['name']}` ({protocol.get('decoding', '')})")
    extra += [f"{k}: `{summary[k]}`" for k in ("rows_evaluated", "parse_rule", "base_quantization") if summary.get(k) is not None]
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
    in adapter_config.json (e.g. a Hub id instead of a local path used for training); the adapter must fit
    that base. Raises MergeError or adapters.AdapterError (one line) before writing anything."""
    src, out = Path(adapter_dir), Path(out_dir)
    ad = read_adapter(src)  # validates: LoRA, safetensors, A/B pairs
    config = dict(ad.config)
    if base:
        config["base_model_name_or_path"] = base
    config["inference_mode"] = True
    base_name = config.get("base_model_name_or_path")
    if not base_name:
        raise MergeError(f"{src}/{ADAPTER_CONFIG} names no base model. Fix: pass --base (the Hub id of the base).")
    check_adapter_fits(base_layout_for(base_name), src, fix="pass --base the base model the adapter was trained on")
    recipe_text = None
    if recipe_path is not None:
        rp = Path(recipe_path)
        if not rp.is_file():
            raise MergeError(f"recipe {rp} not found. Fix: pass the run's recipe.yaml, or leave --recipe out.")
        try:
            recipe_text = rp.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as err:
            raise MergeError(f"cannot read the recipe {rp}: {err}. Fix: pass the run's recipe.yaml (UTF-8 text), "
                             "or leave --recipe out.") from None
    eval_lines = None
    if eval_summary is not None:
        if isinstance(eval_summary, dict):
            summary = eval_summary
        else:
            try:
                summary = json.loads(Path(eval_summary).read_text(encoding="utf-8"))
            except (OSError, json.JSONDecodeError, UnicodeDecodeError) as err:
                raise MergeError(f"cannot read the eval summary {eval_summary}: {err}. Fix: pass the <predictions>.summary.json "
                                 "written by `echoink-lite eval`.") from None
        try:
            eval_lines = _eval_lines(summary)
        except (AttributeError, TypeError, ValueError, KeyError) as err:  # valid JSON of another shape
            raise MergeError(f"the eval summary {eval_summary} is not an eval summary ({type(err).__name__}: {err}). Fix: "
                             "pass the <predictions>.summary.json written by `echoink-lite eval`.") from None
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise MergeError(f"--out {out} exists and is not empty. Fix: pass a new folder.")
    target, folder = out.expanduser().resolve(), src.expanduser().resolve()
    if target == folder or folder in target.parents:
        raise MergeError(f"--out {out} is inside the adapter folder {src}. Fix: pass a folder outside it, e.g. {folder.parent / 'export'}.")
    # Written into a hidden sibling folder renamed to --out at the end: a failed write leaves nothing there.
    from .safe_output import OutputError, new_partial_folder

    try:
        tmp = new_partial_folder(out, "--out")
    except OutputError as err:
        raise MergeError(str(err)) from None
    try:
        (tmp / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        shutil.copy2(src / ADAPTER_WEIGHTS, tmp / ADAPTER_WEIGHTS)
        (tmp / "README.md").write_text(_model_card(config, recipe_text, Path(recipe_path).name if recipe_path else None, eval_lines))
        if out.exists():
            out.rmdir()  # empty (checked above)
        tmp.rename(out)
    except OSError as err:
        shutil.rmtree(tmp, ignore_errors=True)
        raise MergeError(f"cannot write --out {out}: {err.strerror or err} ({err.filename or out}); nothing was left at "
                         "--out. Fix: pass a folder you can write to.") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
