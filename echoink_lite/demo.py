"""`echoink-lite demo`: the whole kit, offline, on a CPU box (README.md gives measured times).

synthetic data -> tiny Omni model -> short supervised warm start (format only, random answer letters)
-> GRPO with QLoRA (4-bit NF4 base + LoRA on the language model) -> evaluation before and after on the
synthetic validation split -> modality check (swap each item's audio, image, or both with another item's)
-> reward curves PNG -> merge the adapter -> one `infer` call on the merged model.

Every number printed is measured in this run. The synthetic task needs both the picture (red or blue)
and the sound (low or high tone), so a model that ignores one modality falls towards 50%, and one that
ignores both towards 25% (chance over four options). recipes/tiny_cpu.yaml holds the same training values
with the reason for each one that differs from the paper's; docs/reproduction.md lists them all.

It writes everything under its own folder (`demo_runs/demo` by default) and starts the GRPO run and the
evaluation afresh each time; the CPU runbook (docs/runbook-cpu.md) uses another folder (`runs/tiny-cpu`),
so a run by hand never mixes with the demo's. A rerun replaces only what an earlier demo wrote there:
`check_demo_folder` refuses, before anything is written, a folder holding anything else (a file of the
user's, a run of their own), naming it.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from pathlib import Path

from rich.console import Console
from rich.markup import escape
from rich.table import Table

# The demo's GRPO recipe, embedded so the demo needs no file. recipes/tiny_cpu.yaml holds the same training
# values (a test keeps them equal) in the runbook's folders; `demo_recipe` points these paths into the demo's
# own folder. Paper settings, scaled down: see that file's comments for each deviation.
DEMO_RECIPE: dict = {
    "description": "Offline CPU demo and tests: tiny Omni thinker, synthetic audio+image data, QLoRA GRPO.",
    "model": {"name_or_path": "demo_runs/demo/warm-model", "dtype": "float32", "gradient_checkpointing": False},
    "quantization": {"load_in_4bit": True},
    "lora": {"r": 16, "alpha": 32, "dropout": 0.0},
    "data": {"train": "demo_runs/demo/data/train", "valid": "demo_runs/demo/data/valid", "max_audio_seconds": 1.0},
    "grpo": {"prompts_per_step": 8, "group_size": 8, "micro_batch_size": 64, "rollout_batch_size": 64, "beta": 0.04,
             "rewards": {"accuracy": 1.0, "format": 0.5}},
    "generation": {"max_prompt_tokens": 512, "max_completion_tokens": 32},
    "schedule": {"learning_rate": 3e-3, "epochs": 4.0, "max_steps": 120, "seed": 0},
    "checkpoint": {"output_dir": "demo_runs/demo/run", "save_every_steps": 20, "save_every_minutes": 5.0, "keep_last": 2},
    "logging": {"run_name": "demo"},
}


def demo_recipe(out: Path, quick: bool = False, seed: int = 0):
    from .recipe import recipe_from_dict

    d = json.loads(json.dumps(DEMO_RECIPE))
    d["model"]["name_or_path"] = str(out / "warm-model")
    d["data"]["train"], d["data"]["valid"] = str(out / "data" / "train"), str(out / "data" / "valid")
    d["checkpoint"]["output_dir"] = str(out / "run")
    d["schedule"]["seed"] = seed
    if quick:
        d["schedule"]["max_steps"] = 3
        d["grpo"].update(prompts_per_step=4, group_size=4, micro_batch_size=16, rollout_batch_size=16)
    return recipe_from_dict(d, "demo recipe")


DEMO_KIND = "demo"
_DEMO_ENTRIES = ("data", "tiny-model", "warm-model", "run", "eval", "merged", "demo_summary.json")
_RUN_ENTRIES = {"recipe.yaml", "metrics.jsonl", "curves.png", "adapter", "checkpoints", "train.lock"}


def _merged_foreign(folder: Path) -> list[str]:
    """Files of `folder` that `merge` does not write (it writes no marker: its folders are for publishing)."""
    from .merge import _PROCESSOR_FILES

    names = {"config.json", "generation_config.json", "README.md", "model.safetensors.index.json", "spk_dict.pt",
             *_PROCESSOR_FILES}
    shard = re.compile(r"^model(-\d{5}-of-\d{5})?\.safetensors$")
    card = folder / "README.md"
    if card.is_file() and "# Merged EchoInk-lite model" not in card.read_text(encoding="utf-8", errors="replace"):
        return ["README.md"]
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*")
                  if p.parent != folder or not (p.is_file() and (p.name in names or shard.match(p.name))))


def _model_files_foreign(folder: Path) -> list[str]:
    """Files of a model folder written before the output marker that save_pretrained does not write."""
    from .merge import _PROCESSOR_FILES

    names = {"config.json", "generation_config.json", "model.safetensors", *_PROCESSOR_FILES}
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.parent != folder or p.name not in names)


def _run_foreign(run: Path, out: Path) -> list[str]:
    """Entries of `run` that are not the demo's own GRPO run (its recipe.yaml names this demo folder)."""
    import yaml

    entries = sorted(p.name for p in run.iterdir())
    if not entries:
        return []
    try:
        saved = yaml.safe_load((run / "recipe.yaml").read_text(encoding="utf-8"))
        ours = (Path(saved["checkpoint"]["output_dir"]).resolve() == (out / "run").resolve()
                and Path(saved["model"]["name_or_path"]).resolve() == (out / "warm-model").resolve())
    except (OSError, UnicodeDecodeError, yaml.YAMLError, KeyError, TypeError):
        ours = False
    if not ours:
        return [f"run/{entries[0]} (a run folder this demo did not write)"]
    return [f"run/{e}" for e in entries if e not in _RUN_ENTRIES and not (e.startswith(".") and ".tmp" in e)]


def demo_folder_foreign(out: Path) -> list[str]:
    """What in `out` an earlier demo did not write (empty for a new or empty folder, or an earlier demo's)."""
    from .safe_output import DEMO_SUMMARY, FOLDER_MARKER, PREDICTIONS, folder_marker, foreign_files
    from .synth import synth_foreign_files
    from .warmstart import WARM_START_KIND

    entries = sorted(p.name for p in out.iterdir())
    if not entries:
        return []
    marker = folder_marker(out)
    # a demo folder of an echoink-lite before the marker: recognised by its summary and the checks below
    legacy = marker is None and DEMO_SUMMARY.recognise(out / "demo_summary.json")
    if not legacy and (marker is None or marker["kind"] != DEMO_KIND):
        return entries
    foreign = [e for e in entries if e not in _DEMO_ENTRIES and e != FOLDER_MARKER]
    checks = {"data": synth_foreign_files, "merged": _merged_foreign, "run": lambda p: _run_foreign(p, out),
              "tiny-model": _model_files_foreign if legacy else lambda p: foreign_files(p, "tiny"),
              "warm-model": _model_files_foreign if legacy else lambda p: foreign_files(p, WARM_START_KIND)}
    for name, check in checks.items():
        path = out / name
        if path.is_symlink() or (path.exists() and not path.is_dir()):
            foreign.append(name)
        elif path.is_dir():
            foreign += [f if f.startswith(f"{name}/") else f"{name}/{f}" for f in check(path)]
    evals = out / "eval"
    if evals.is_dir():
        foreign += [f"eval/{p.name}" for p in evals.iterdir()
                    if p.name != "predictions.jsonl" or not (p.stat().st_size == 0 or PREDICTIONS.recognise(p))]
    summary = out / "demo_summary.json"
    if summary.exists() and not DEMO_SUMMARY.recognise(summary):
        foreign.append("demo_summary.json")
    return foreign


def check_demo_folder(out: Path) -> None:
    """OutputError (one line) unless `out` is new, empty, or an earlier demo's folder holding nothing else."""
    from .safe_output import OutputError, check_output_folder

    check_output_folder(out, DEMO_KIND, "demo --out", foreign=demo_folder_foreign)
    if out.is_dir() and not os.access(out, os.W_OK | os.X_OK):
        raise OutputError(f"cannot write demo --out {out}: the folder is not writable. Fix: pass a folder you can write to.")


def _claim_demo_folder(out: Path) -> None:
    """Mark `out` as the demo's (its marker names the entries the demo owns), after `check_demo_folder`."""
    from .safe_output import FOLDER_MARKER, write_bytes_atomic

    out.mkdir(parents=True, exist_ok=True)
    marker = {"kind": DEMO_KIND, "files": list(_DEMO_ENTRIES)}
    write_bytes_atomic(out / FOLDER_MARKER, (json.dumps(marker, indent=1) + "\n").encode("utf-8"))


def merge_into_demo_folder(out: Path, adapter_dir: Path, console: Console) -> dict:
    """Merge the demo's adapter into `out/merged`, replacing an earlier demo's merge there (checked first)."""
    from .merge import merge_adapter
    from .safe_output import OutputError

    merged_dir = out / "merged"
    if merged_dir.is_dir():
        foreign = _merged_foreign(merged_dir)
        if foreign:
            raise OutputError(f"demo --out {out}: merged/{foreign[0]} was not written by the demo; it is not deleted. "
                              "Fix: move it away, or pass another --out.")
        shutil.rmtree(merged_dir)  # an earlier demo's merge: the demo measures afresh each time
    return merge_adapter(str(adapter_dir), str(merged_dir), base=str(out / "warm-model"), format="thinker",
                         dtype="fp32", verify=True, console=console)


def run_demo(out: str | Path = "demo_runs/demo", quick: bool = False, seed: int = 0, console: Console | None = None) -> dict:
    import torch

    from .data import scan_split
    from .eval_model import load_model
    from .eval_report import print_summary
    from .evaluate import EvalConfig, evaluate_rows, load_eval_model
    from .grpo import train
    from .infer import infer
    from .metrics import plot_run
    from .modeling import usable_cpus
    from .row_media import derange
    from .safe_output import DEMO_SUMMARY, write_json_output
    from .synth import write_synth_set
    from .tiny import build_tiny_omni
    from .warmstart import warm_start

    console = console or Console()
    out = Path(out)
    check_demo_folder(out)  # before anything is written: nothing but an earlier demo's files may be replaced
    _claim_demo_folder(out)
    t0 = time.time()
    console.print(f"torch threads: {torch.get_num_threads()} of {usable_cpus()} CPUs "
                  "(ECHOINK_THREADS sets it; use 1 on a busy machine)", highlight=False)
    timings: dict[str, float] = {}

    def phase(name: str) -> None:
        timings[name] = round(time.time() - t0 - sum(timings.values()), 1)

    console.rule("[bold]1/7 synthetic data (AVQA-R1-6K layout)")
    n_train, n_valid = (32, 16) if quick else (256, 128)
    for split_dir, n in zip(write_synth_set(out / "data", n_train, n_valid, seed), (n_train, n_valid)):
        console.print(f"wrote {n} {split_dir.name} items to {split_dir}", highlight=False, markup=False)
    phase("data")

    console.rule("[bold]2/7 tiny Qwen2.5-Omni (real classes, random weights, the Hub checkpoint's layout)")
    tiny_dir = build_tiny_omni(out / "tiny-model", seed=seed)
    console.print(f"model folder: {tiny_dir}")
    phase("tiny model")

    console.rule("[bold]3/7 warm start: answer format with random letters (accuracy stays at chance)")
    warm_start(tiny_dir, out / "data" / "train", out / "warm-model", steps=10 if quick else 250, seed=seed,
               max_audio_seconds=1.0, console=console)
    phase("warm start")

    console.rule("[bold]4/7 GRPO with QLoRA (4-bit NF4 base, LoRA on the language model)")
    recipe = demo_recipe(out, quick, seed)
    if (out / "run").is_dir():
        shutil.rmtree(out / "run")  # an earlier demo's run (check_demo_folder): the demo measures afresh each time
    result = train(recipe, console=console)
    phase("grpo")

    console.rule("[bold]5/7 evaluation on the validation split: before vs after GRPO, and the modality check")
    cfg = EvalConfig(model=str(out / "warm-model"), adapter=str(result.adapter_dir), data=str(out / "data" / "valid"),
                     out=str(out / "eval" / "predictions.jsonl"), batch_size=64, max_new_tokens=32,
                     max_audio_seconds=1.0, dtype="float32", device="cpu", compare_base=True)  # base in NF4, as trained
    predictions = out / "eval" / "predictions.jsonl"
    if predictions.exists():
        predictions.unlink()  # the demo measures afresh each time
    model, processor = load_eval_model(cfg)
    rows = scan_split(cfg.data).rows
    with model.disable_adapter():
        before = evaluate_rows(model, processor, rows, cfg, predictions, "before GRPO (base)", console)
    after = evaluate_rows(model, processor, rows, cfg, predictions, "after GRPO (adapter)", console)
    swaps = {which: evaluate_rows(model, processor, derange(rows, which, seed), cfg, predictions, f"after, {which} swapped", console)
             for which in ("audio", "image", "both")}
    print_summary([before, after, *swaps.values()], console, 100 * (after.accuracy - before.accuracy))
    phase("eval")

    console.rule("[bold]6/7 curves")
    png = plot_run(result.run_dir)
    console.print(f"reward curves: {png}")

    console.rule("[bold]7/7 merge the adapter, then ask the merged model one question")
    merged_dir = out / "merged"
    report = merge_into_demo_folder(out, result.adapter_dir, console)
    mmodel, mproc = load_model(str(merged_dir), dtype="float32", device="cpu")
    row = rows[0]
    console.print(f"question (validation item {row.problem_id}, {row.image_path.name} + {row.audio_path.name}): "
                  f"{escape(row.problem)}", highlight=False)
    for option in row.options:
        console.print(f"  {escape(option)}", highlight=False)
    console.print("merged model, greedy:", highlight=False)
    answer = infer(mmodel, mproc, row.audio_path, row.image_path, row.problem, list(row.options), max_new_tokens=32,
                   stream=True, console=console, max_audio_seconds=1.0)
    console.print(_answer_line(answer.get("answer"), row.answer), highlight=False)
    phase("merge + infer")

    summary = {
        "accuracy_before": before.accuracy, "accuracy_after": after.accuracy,
        "accuracy_audio_swapped": swaps["audio"].accuracy, "accuracy_image_swapped": swaps["image"].accuracy,
        "accuracy_both_swapped": swaps["both"].accuracy,
        "format_failure_before": before.format_failure_rate, "format_failure_after": after.format_failure_rate,
        "grpo_steps": result.steps_done, "validation_rows": len(rows), "merge_verification": _jsonable(report),
        # loss-pass tokens (prompt + padded completions per micro-batch) over the whole GRPO run: the share in
        # micro-batches whose advantages were all 0, and the share the run skipped (grpo.skip_zero_advantage_groups)
        "zero_advantage_token_share": result.last_metrics.get("zero_advantage_token_share_run"),
        "skipped_token_share": result.last_metrics.get("skipped_token_share_run"),
        "infer_example": {"problem_id": row.problem_id, "gold": row.answer, "answer": answer.get("answer")},
        "seconds": timings, "total_seconds": round(time.time() - t0, 1), "quick": quick,
        "torch_threads": torch.get_num_threads(), "usable_cpus": usable_cpus(),
    }
    write_json_output(out / "demo_summary.json", summary, DEMO_SUMMARY, "demo summary")
    _print_final(console, summary, out)
    return summary


def _answer_line(answer: str | None, gold: str) -> str:
    given = answer if answer is not None else "none (no valid <answer>)"
    verdict = "correct" if answer == gold else "wrong"
    return f"model's answer: {given}   gold answer: {gold}   ({verdict})"


def _jsonable(obj):
    return json.loads(json.dumps(obj, default=str))


def _print_final(console: Console, s: dict, out: Path) -> None:
    t = Table(title="echoink-lite demo: measured in this run", show_header=True)
    t.add_column("what")
    t.add_column("value", justify="right")
    pct = lambda x: "-" if x is None else f"{100 * x:.1f}%"  # noqa: E731
    t.add_row("validation accuracy before GRPO", pct(s["accuracy_before"]))
    t.add_row("validation accuracy after GRPO", pct(s["accuracy_after"]))
    t.add_row("  ... with each item's audio swapped", pct(s["accuracy_audio_swapped"]))
    t.add_row("  ... with each item's image swapped", pct(s["accuracy_image_swapped"]))
    t.add_row("  ... with both swapped", pct(s["accuracy_both_swapped"]))
    t.add_row("format failures after GRPO", pct(s["format_failure_after"]))
    t.add_row("GRPO steps", str(s["grpo_steps"]))
    t.add_row("loss-pass tokens in zero-advantage groups", pct(s["zero_advantage_token_share"]))
    t.add_row("  ... skipped (beta 0, or skip_zero_advantage_groups)", pct(s["skipped_token_share"]))
    t.add_row("total time", f"{s['total_seconds']:.0f} s, {s['torch_threads']} torch thread(s)")
    console.print(t)
    console.print(f"everything is in {out} (demo_summary.json, run/metrics.jsonl, run/curves.png, merged/)")
    if s["quick"]:
        console.print("[yellow]--quick ran 3 GRPO steps: a smoke test, no learning is expected.[/]")
