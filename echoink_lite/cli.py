"""The `echoink-lite` command: parses arguments and calls the package's functions. No logic lives here, so
every command is also a function a notebook can call."""

from __future__ import annotations

import argparse
import os
import sys

EPILOG = """examples:
  echoink-lite demo                                   # offline end-to-end run on CPU (~10 min)
  echoink-lite data synth data/synth                  # a synthetic set in the AVQA-R1-6K layout
  echoink-lite data check data/avqa/train --report bad.jsonl
  echoink-lite recipes validate recipes/*.yaml
  echoink-lite plan recipes/paper_24gb.yaml --gpu-memory 24GB
  echoink-lite train recipes/paper_24gb.yaml data.train=data/avqa/train --resume auto
  echoink-lite eval --model Qwen/Qwen2.5-Omni-7B --adapter runs/paper-24gb/adapter --data data/avqa/valid --compare-base
  echoink-lite infer --model Qwen/Qwen2.5-Omni-7B --adapter runs/paper-24gb/adapter --audio a.wav --image i.jpg --question "..."
  echoink-lite merge --adapter runs/paper-24gb/adapter --out merged/ --format thinker --dtype bf16
"""


def _recipe_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("recipe", help="YAML recipe (see recipes/)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="override recipe fields, e.g. grpo.group_size=8")


def cmd_train(args) -> int:
    from .grpo import train
    from .recipe import load_recipe

    recipe = load_recipe(args.recipe, args.overrides)
    train(recipe, resume=args.resume, force=args.force)
    return 0


def cmd_recipes_validate(args) -> int:
    from rich.console import Console

    from .recipe import RecipeError, load_recipe

    console = Console()
    failed = 0
    for path in args.files:
        try:
            r = load_recipe(path, args.overrides)
            d = r.derived()
            console.print(f"[green]ok[/] {path}: {d['completions_per_step']} completions/step, "
                          f"{d['micro_batches_per_step']} micro-batches of up to {min(r.grpo.micro_batch_size, r.grpo.group_size)}, "
                          f"{d['decode_batches_per_step']} decode batch(es)/step")
        except RecipeError as err:
            failed += 1
            console.print(f"[red]invalid[/] {err}")
    return 1 if failed else 0


def cmd_recipes_explain(args) -> int:
    from rich.console import Console
    from rich.table import Table

    from .recipe import explain

    t = Table(title="recipe fields")
    for col in ("field", "default", "what it does"):
        t.add_column(col)
    for row in explain():
        t.add_row(*row)
    Console().print(t)
    return 0


def cmd_data_check(args) -> int:
    from .data import check_command

    return check_command(args.path, args.report)


def cmd_data_synth(args) -> int:
    from .synth import synth_command

    return synth_command(args.out, train=args.train, valid=args.valid, seed=args.seed)


def cmd_plot(args) -> int:
    from .metrics import plot_run

    print(plot_run(args.run_dir, args.out))
    return 0


def cmd_tiny(args) -> int:
    from .tiny import build_tiny_full_omni, build_tiny_thinker

    out = build_tiny_full_omni(args.out) if args.full else build_tiny_thinker(args.out)
    print(out)
    return 0


def cmd_demo(args) -> int:
    from .demo import run_demo

    run_demo(args.out, quick=args.quick, seed=args.seed)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="echoink-lite",
        description="GRPO with QLoRA for Qwen2.5-Omni audio + image reasoning (EchoInk-R1) on one GPU.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("demo", help="offline end-to-end demo on CPU: data, tiny model, warm start, GRPO, eval, merge, infer")
    p.add_argument("--out", default="demo_runs/demo", help="folder for everything the demo makes")
    p.add_argument("--quick", action="store_true", help="a few steps only (a smoke test, no learning expected)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("train", help="GRPO training of LoRA adapters on the 4-bit thinker")
    _recipe_args(p)
    p.add_argument("--resume", default=None, help="'auto' (newest complete checkpoint in the run folder) or a checkpoint path")
    p.add_argument("--force", action="store_true", help="start even if the planner says the recipe does not fit the GPU")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("recipes", help="validate or explain recipes")
    rsub = p.add_subparsers(dest="recipes_command", required=True)
    v = rsub.add_parser("validate", help="check recipes (and overrides) and print derived numbers")
    v.add_argument("files", nargs="+")
    v.add_argument("--set", dest="overrides", action="append", default=[], metavar="key=value")
    v.set_defaults(func=cmd_recipes_validate)
    e = rsub.add_parser("explain", help="every recipe field with its default and description")
    e.set_defaults(func=cmd_recipes_explain)

    p = sub.add_parser("data", help="check or synthesise AVQA-layout data")
    dsub = p.add_subparsers(dest="data_command", required=True)
    c = dsub.add_parser(
        "check", help="read every row and file; report rejected rows (exit 1 if any)",
        description="Read every row, decode every audio and image file with the training caps, and check them "
                    "against the processor's and model's limits.",
        epilog="exit codes: 0 every row usable; 1 rejected rows found (or the list file is unusable); "
               "2 the check could not run (the path does not exist or cannot be read, or --report cannot be written)",
    )
    c.add_argument("path", help="split folder, its JSON list, or a JSON Lines file")
    c.add_argument("--report", help="write one JSON line per rejected row here (checked for writability first)")
    c.set_defaults(func=cmd_data_check)
    s = dsub.add_parser("synth", help="write a synthetic audio+image multiple-choice set in the AVQA-R1-6K layout")
    s.add_argument("out")
    s.add_argument("--train", type=int, default=256)
    s.add_argument("--valid", type=int, default=128)
    s.add_argument("--seed", type=int, default=0)
    s.set_defaults(func=cmd_data_synth)

    from .evaluate import add_eval_arguments, eval_command

    p = sub.add_parser("eval", help="accuracy on a split (base, adapter, or merged; --compare-base)")
    add_eval_arguments(p)
    p.set_defaults(func=eval_command)

    from .infer import add_infer_arguments, infer_command

    p = sub.add_parser("infer", help="ask one question about an image and a sound")
    add_infer_arguments(p)
    p.set_defaults(func=infer_command)

    from .merge import add_export_arguments, add_merge_arguments, export_command, merge_command

    p = sub.add_parser("merge", help="merge an adapter into the unquantized base (thinker-only or full Omni)")
    add_merge_arguments(p)
    p.set_defaults(func=merge_command)
    p = sub.add_parser("export", help="export a clean adapter folder with a model card (optionally push to the Hub)")
    add_export_arguments(p)
    p.set_defaults(func=export_command)

    from .plan import add_plan_arguments, plan_command

    p = sub.add_parser("plan", help="estimate peak GPU memory of a recipe and whether it fits")
    add_plan_arguments(p)
    p.set_defaults(func=plan_command)

    p = sub.add_parser("plot", help="draw reward / accuracy / length curves of a run folder to a PNG")
    p.add_argument("run_dir")
    p.add_argument("--out", default=None)
    p.set_defaults(func=cmd_plot)

    p = sub.add_parser("tiny", help="build the offline tiny Qwen2.5-Omni model folder (for tests and trials)")
    p.add_argument("out")
    p.add_argument("--full", action="store_true", help="a complete Omni model (thinker + talker + token2wav)")
    p.set_defaults(func=cmd_tiny)
    return parser


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    args = build_parser().parse_args(argv)
    from .checkpoints import ResumeError
    from .data import DataError
    from .grpo import TrainingError
    from .modeling import ModelLoadError
    from .recipe import RecipeError

    try:
        return int(args.func(args) or 0)
    except (RecipeError, DataError, ResumeError, TrainingError, ModelLoadError) as err:
        print(f"echoink-lite {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: complete checkpoints are kept; continue with --resume auto", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
