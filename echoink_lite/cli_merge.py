"""The `echoink-lite merge` and `echoink-lite export` commands: their arguments, and the exit codes and
one-line refusals around ``merge.merge_adapter`` and ``export.export_adapter`` (both can push to the Hub).

Exit codes: 0 done; 1 the folder was written but its verification failed or it was not uploaded (it stays);
2 refused, nothing written.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def add_merge_arguments(p: argparse.ArgumentParser) -> None:
    a = p.add_argument
    a("--adapter", required=True, help="LoRA adapter folder (adapter_config.json + adapter_model.safetensors)")
    a("--out", required=True, help="new folder for the merged model (must not exist or be empty; not inside the adapter or base folder)")
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


def add_export_arguments(p: argparse.ArgumentParser) -> None:
    a = p.add_argument
    a("--adapter", required=True, help="LoRA adapter folder saved by a training run")
    a("--out", required=True, help="new folder for the clean adapter + model card")
    a("--recipe", default=None, help="recipe YAML to include in the model card")
    a("--eval-summary", default=None, help="<predictions>.summary.json from `echoink-lite eval`, for the model card")
    a("--base", default=None, help="base model id to record, e.g. its Hub id (default: the adapter's base_model_name_or_path); "
      "the adapter must fit it")
    a("--push-to-hub", default=None, metavar="REPO", help="upload the exported folder to this Hub model repo")
    a("--private", action="store_true", help="create the Hub repo as private")


def merge_option_problem(max_shard_size_gb: float, verify: bool, verify_device: str) -> str | None:
    """One line when --max-shard-size-gb or --verify-device cannot work, else None; checked before anything is
    written. Without it a NaN or infinite shard size ended in a traceback, a size of 0 wrote one shard per tensor,
    and a device such as `cuda` on a machine without one failed in the verification, after the whole merge."""
    import math

    import torch

    if not (math.isfinite(max_shard_size_gb) and 0.01 <= max_shard_size_gb <= 1024):
        return (f"--max-shard-size-gb {max_shard_size_gb!r}: expected a size from 0.01 to 1024 GB (the Hub's "
                "checkpoints use about 4-5). Fix: pass e.g. --max-shard-size-gb 5.")
    if not verify:
        return None
    try:
        device = torch.device(verify_device)
    except (RuntimeError, ValueError):
        return f"--verify-device {verify_device!r} is not a torch device. Fix: pass cpu or cuda (or cuda:N)."
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0 or (device.index is not None and device.index >= count):
            return (f"--verify-device {verify_device}: this machine has {count} CUDA device(s). "
                    "Fix: pass --verify-device cpu (or a device it has), or --no-verify.")
    elif device.type != "cpu":
        return f"--verify-device {verify_device}: the verification runs on cpu or cuda only. Fix: pass cpu or cuda."
    return None


def _refused(args, err) -> int:
    """A refusal: one line on stderr, exit code 2 (as main() does for the kit's other errors)."""
    print(f"echoink-lite {args.command}: error: {err}", file=sys.stderr)
    return 2


def _push(console, folder, args) -> int:
    from .export import push_to_hub

    try:
        url = push_to_hub(folder, args.push_to_hub, private=args.private)
    except Exception as err:  # network, auth: say it plainly, the folder stays
        console.print(f"[bold red]upload failed:[/] {type(err).__name__}: {err}", highlight=False)
        return 1
    console.print(f"uploaded to {url}")
    return 0


def cmd_merge(args) -> int:
    """0: merged (and verified unless --no-verify); 1: verification or upload failed; 2: refused (nothing written)."""
    from rich.console import Console

    from .merge import merge_adapter
    from .merge_base import MergeError
    from .safe_output import MERGE_REPORT, OutputError, check_output_file, write_json_output

    console = Console()
    problem = merge_option_problem(args.max_shard_size_gb, not args.no_verify, args.verify_device)
    if problem:
        return _refused(args, problem)
    try:
        if args.report:  # refused before the merge, not after it
            check_output_file(args.report, MERGE_REPORT, "--report")
            if Path(args.report).expanduser().resolve() == Path(args.out).expanduser().resolve():
                raise OutputError(f"--report {args.report} is the --out folder; pass a file beside it, e.g. merge_report.json")
        report = merge_adapter(args.adapter, args.out, base=args.base, format=args.format, dtype=args.dtype,
                               verify=not args.no_verify, console=console, revision=args.revision,
                               verify_device=args.verify_device, max_shard_size=int(args.max_shard_size_gb * 1024**3))
    except (MergeError, OutputError) as err:
        return _refused(args, err)
    if args.report:
        try:
            write_json_output(args.report, report, MERGE_REPORT, "--report", default=str)
        except OutputError as err:
            return _refused(args, f"{err} The merged model is in {args.out}.")
    if report["ok"] is False:
        console.print("[bold red]verification failed[/]: the merged folder was written but does not match base + adapter; "
                      "do not publish it. Nothing was pushed.")
        return 1
    untrained = ((report.get("verification") or {}).get("weights") or {}).get("untrained_adapter")
    if args.push_to_hub and untrained:
        console.print("[bold red]not pushed[/]: every LoRA B is zero (an untrained adapter), so the merged model equals "
                      "the base. Train the adapter first; the merged folder is in " + str(args.out), highlight=False)
        return 1
    return _push(console, args.out, args) if args.push_to_hub else 0


def cmd_export(args) -> int:
    """0: exported (and uploaded with --push-to-hub); 1: upload failed; 2: refused (nothing written)."""
    from rich.console import Console

    from .adapters import read_adapter_config
    from .export import export_adapter
    from .merge_base import MergeError

    console = Console()
    try:
        out = export_adapter(args.adapter, args.out, recipe_path=args.recipe, eval_summary=args.eval_summary, base=args.base)
    except MergeError as err:
        return _refused(args, err)
    console.print(f"exported the adapter to {out} (adapter_config.json, adapter_model.safetensors, README.md)", highlight=False)
    base = read_adapter_config(out).get("base_model_name_or_path", "")
    if Path(base).expanduser().exists():
        console.print(f"note: the model card names the base by a local path ({base}); for the Hub, export again with "
                      "--base and the base's Hub id (e.g. Qwen/Qwen2.5-Omni-7B)", highlight=False)
    return _push(console, out, args) if args.push_to_hub else 0
