"""The `echoink-lite` command: parses arguments and calls the package's functions. No logic lives here, so
every command is also a function a notebook can call. The arguments and error handling of `eval` / `infer`
live in ``cli_eval``, those of `merge` / `export` in ``cli_merge``; this module builds the parser from them
and holds the small commands and ``main``."""

from __future__ import annotations

import argparse
import os
import re
import shutil
import sys
import textwrap
from pathlib import Path

from .cli_eval import add_eval_arguments, add_infer_arguments, cmd_eval, cmd_infer
from .cli_merge import add_export_arguments, add_merge_arguments, cmd_export, cmd_merge

EPILOG = """examples:
  echoink-lite demo                                   # offline end-to-end run on CPU (times: README)
  echoink-lite data synth data/synth                  # a synthetic set in the AVQA-R1-6K layout
  echoink-lite data check data/avqa/train --report bad.jsonl
  echoink-lite recipes validate recipes/*.yaml
  echoink-lite plan recipes/paper_24gb.yaml --gpu-memory 12GB grpo.micro_batch_size=1   # key=value anywhere
  echoink-lite train recipes/paper_24gb.yaml data.train=data/avqa/train --resume auto
  echoink-lite eval --adapter runs/paper-24gb/adapter --data data/avqa/valid --compare-base   # base from the adapter
  echoink-lite infer --adapter runs/paper-24gb/adapter --audio a.wav --image i.jpg --question "..."
  echoink-lite merge --adapter runs/paper-24gb/adapter --out merged/ --format thinker --dtype bf16
"""


def _recipe_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("recipe", help="YAML recipe (see recipes/)")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="override recipe fields, anywhere on the line, e.g. grpo.group_size=8")


# `section.key=value`: a dotted recipe key (reward names may hold ':' and '-'), '=', then anything.
_OVERRIDE = re.compile(r"^[A-Za-z_]\w*(\.[\w:\-]+)*=")


def looks_like_override(token: str) -> bool:
    """True for a `key=value` recipe override (and not an existing file whose name happens to hold '=')."""
    return bool(_OVERRIDE.match(token)) and not Path(token).exists()


def parse_args(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """Parse the command line, taking `key=value` overrides anywhere on it.

    argparse fills a `nargs="*"` positional from the first run of positionals only, so an override after an
    option (`plan R --gpu-memory 12GB grpo.micro_batch_size=1`, the way the planner's advice gets pasted) is
    left over. Left-over overrides join `args.overrides` for commands that take them; anything else is the
    usual "unrecognized arguments" error.
    """
    args, extras = parser.parse_known_args(argv)
    takes_overrides = hasattr(args, "overrides")
    if takes_overrides and hasattr(args, "files"):  # `recipes validate FILE... key=value`
        args.overrides = list(args.overrides) + [f for f in args.files if looks_like_override(f)]
        args.files = [f for f in args.files if not looks_like_override(f)]
        if not args.files:
            parser.error("recipes validate: name at least one recipe file")
    late = [x for x in extras if takes_overrides and looks_like_override(x)]
    unknown = [x for x in extras if x not in late]
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    if late:
        args.overrides = list(args.overrides) + late
    return args


_GPU_MEMORY = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*(gib|gb|g|mib|mb|m|tib|tb|t)?\s*$", re.IGNORECASE)


def parse_gpu_memory(text: str) -> float:
    """'24GB', '24', '80GiB', '24 G', '16000MiB' -> GiB. GB is read as GiB: a '24GB' card holds 24 GiB."""
    m = _GPU_MEMORY.match(str(text))
    if not m:
        raise argparse.ArgumentTypeError(f"cannot read GPU memory '{text}': write e.g. 24GB, 24, 80GiB or 16000MiB")
    value, unit = float(m.group(1)), (m.group(2) or "g").lower()
    if unit in ("mib", "mb", "m"):
        value /= 1024
    elif unit in ("tib", "tb", "t"):
        value *= 1024
    if value <= 0:
        raise argparse.ArgumentTypeError(f"GPU memory must be positive, got '{text}'")
    return value


def cmd_plan(args) -> int:
    from .plan import plan_command

    return plan_command(args.recipe, args.overrides, gpu_memory_gib=args.gpu_memory, headroom=args.headroom,
                        text_tokens=args.text_tokens, json_out=args.json_out)


def cmd_train(args) -> int:
    from .grpo import train
    from .recipe import load_recipe

    recipe = load_recipe(args.recipe, args.overrides)
    train(recipe, resume=args.resume, force=args.force, overwrite=args.overwrite)
    return 0


def cmd_recipes_validate(args) -> int:
    from rich.console import Console
    from rich.markup import escape

    from .recipe import RecipeError, load_recipe

    console = Console(highlight=False, soft_wrap=True)
    failed = 0
    for path in args.files:
        try:
            r = load_recipe(path, args.overrides)
            d = r.derived()
            rows, note = r.train_rows()
            n = r.derived(rows) if rows is not None else None  # refuses a schedule of 0 steps
        except RecipeError as err:
            failed += 1
            message = str(err) if str(err).startswith(str(path)) else f"{path}: {err}"
            console.print(f"[red]invalid[/] {escape(message)}")
            continue
        g, s = r.grpo, r.schedule
        micro = min(g.micro_batch_size, g.group_size)
        console.print(f"[green]ok[/] {escape(str(path))}: {g.prompts_per_step} prompts x {g.group_size} = "
                      f"{d['completions_per_step']} completions/step in {d['micro_batches_per_step']} micro-batches "
                      f"of up to {micro} (one group each), {d['decode_batches_per_step']} decode batch(es)/step")
        cap = f", at most schedule.max_steps={s.max_steps}" if s.max_steps else ""
        if n is None:
            console.print(f"   steps: {s.epochs:g} epoch(s) x ceil(training rows / {g.prompts_per_step} prompts){cap}; "
                          f"not counted: {escape(note)}")
        else:
            console.print(f"   steps: {n['total_steps']} ({n['steps_per_epoch']} per epoch x {s.epochs:g} epoch(s){cap}); "
                          f"{escape(note)}")
    return 1 if failed else 0


def cmd_recipes_explain(args) -> int:
    """Every recipe key with its default, its TRL GRPOConfig counterpart and what it does. Names and defaults
    are never cut: only the text wraps, to the terminal's width."""
    from .recipe_reference import explain

    width = max(60, shutil.get_terminal_size((100, 24)).columns)
    section = None
    for key, default, trl, description in explain():
        head = key.split(".")[0] if "." in key else ""
        if head != section:
            section = head
            print(f"\n[{section}]" if section else "recipe keys (`echoink-lite recipes validate FILE` checks a recipe)")
        print(textwrap.fill(f"{key} = {default}", width, subsequent_indent="      ", break_long_words=False,
                            break_on_hyphens=False))
        for text in (description, f"TRL GRPOConfig: {trl}"):
            print(textwrap.fill(text, width, initial_indent="    ", subsequent_indent="    ",
                                break_long_words=False, break_on_hyphens=False))
    return 0


def cmd_data_check(args) -> int:
    from .data_check import check_command

    return check_command(args.path, args.report)


def cmd_data_synth(args) -> int:
    from .synth import synth_command

    return synth_command(args.out, train=args.train, valid=args.valid, seed=args.seed)


def cmd_plot(args) -> int:
    from .metrics import MetricsFileError, plot_run
    from .safe_output import OutputError

    try:
        print(plot_run(args.run_dir, args.out))
    except (OSError, MetricsFileError, OutputError) as err:  # no metrics.jsonl, a bad value, a refused --out
        print(f"echoink-lite plot: error: {err}", file=sys.stderr)
        return 2
    return 0


def cmd_tiny(args) -> int:
    from .tiny import build_tiny_omni, build_tiny_thinker

    from .safe_output import OutputError

    try:
        out = build_tiny_thinker(args.out) if args.thinker_only else build_tiny_omni(args.out)
    except OSError as err:
        raise OutputError(f"cannot write tiny OUT {args.out}: {err.strerror or err}; an earlier model there is "
                          "unchanged. Fix: free space or pass a folder you can write to.") from None
    print(out)
    return 0


def cmd_demo(args) -> int:
    from .demo import run_demo
    from .flag_ranges import FlagRangeError, check_flag

    try:
        check_flag("data_seed", args.seed)
    except FlagRangeError as err:
        print(f"echoink-lite demo: error: {err}", file=sys.stderr)
        return 2
    run_demo(args.out, quick=args.quick, seed=args.seed)
    return 0


def _add_group(sub, name: str, help: str):
    """A command made of subcommands (`recipes`, `data`). Without one it lists them, rather than argparse's
    'the following arguments are required: recipes_command'."""
    group = sub.add_parser(name, help=help, description=help)
    inner = group.add_subparsers(dest=f"{name}_command", metavar="SUBCOMMAND", title="subcommands")

    def list_subcommands(args) -> int:
        lines = [f"{group.prog}: choose a subcommand:"]
        lines += [f"  {group.prog} {choice}: {p.description}" for choice, p in inner.choices.items()]
        print("\n".join(lines), file=sys.stderr)
        return 2

    group.set_defaults(func=list_subcommands)
    return inner


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
    p.add_argument("--seed", type=int, default=0,
                   help="seeds the synthetic data, the tiny model, the warm start and GRPO (default 0, the README's run)")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("train", help="GRPO training of LoRA adapters on the 4-bit thinker")
    _recipe_args(p)
    p.add_argument("--resume", default=None, help="'auto' (the newest intact checkpoint in the run folder; a fresh "
                   "start if there is none), a checkpoint folder, or a run folder")
    p.add_argument("--force", action="store_true", help="start even if the planner says the recipe does not fit the GPU")
    p.add_argument("--overwrite", action="store_true",
                   help="start afresh in a run folder that holds an earlier run: it is renamed to <folder>.old-<time>, "
                   "not deleted")
    p.set_defaults(func=cmd_train)

    rsub = _add_group(sub, "recipes", "validate or explain recipes")
    text = "check recipes (and overrides), print the derived batch numbers and, when data.train is readable, the steps"
    v = rsub.add_parser("validate", help=text, description=text)
    v.add_argument("files", nargs="+", metavar="FILE", help="YAML recipe(s), e.g. recipes/*.yaml; key=value overrides may follow")
    v.add_argument("--set", dest="overrides", action="append", default=[], metavar="key=value",
                   help="override a recipe field in every FILE (repeatable; a bare key=value works too)")
    v.set_defaults(func=cmd_recipes_validate)
    text = "every recipe key with its default, its TRL GRPOConfig equivalent and what it does"
    e = rsub.add_parser("explain", help=text, description=text)
    e.set_defaults(func=cmd_recipes_explain)

    dsub = _add_group(sub, "data", "check or synthesise AVQA-layout data")
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
    text = "write a synthetic audio+image multiple-choice set in the AVQA-R1-6K layout"
    s = dsub.add_parser("synth", help=text, description=text)
    s.add_argument("out", help="folder to write; gets OUT/train and OUT/valid, each with its JSON, audios/ and images/")
    s.add_argument("--train", type=int, default=256, metavar="N", help="training items (default 256)")
    s.add_argument("--valid", type=int, default=128, metavar="M", help="validation items (default 128)")
    s.add_argument("--seed", type=int, default=0, help="same seed, byte-identical files (default 0)")
    s.set_defaults(func=cmd_data_synth)

    p = sub.add_parser("eval", help="accuracy on a split (base, adapter, or merged; --compare-base)")
    add_eval_arguments(p)
    p.set_defaults(func=cmd_eval)
    p = sub.add_parser("infer", help="ask one question about an image and a sound")
    add_infer_arguments(p)
    p.set_defaults(func=cmd_infer)

    p = sub.add_parser("merge", help="merge an adapter into the unquantized base (thinker-only or full Omni)")
    add_merge_arguments(p)
    p.set_defaults(func=cmd_merge)
    p = sub.add_parser("export", help="export a clean adapter folder with a model card (optionally push to the Hub)")
    add_export_arguments(p)
    p.set_defaults(func=cmd_export)

    from .memory_estimate import DEFAULT_HEADROOM, DEFAULT_TEXT_TOKENS

    text = "estimate peak GPU memory of a recipe (GiB), whether it fits, and which knobs to turn if not"
    p = sub.add_parser("plan", help=text, description=text)
    _recipe_args(p)
    p.add_argument("--gpu-memory", type=parse_gpu_memory, default=None, metavar="SIZE",
                   help="GPU memory to plan for, e.g. 24GB, 48, 80GiB; GB is read as GiB, what a '24GB' card holds "
                        "(default: the detected GPU, else 24GB)")
    p.add_argument("--headroom", type=float, default=DEFAULT_HEADROOM,
                   help=f"fraction of the GPU kept free for what the estimate cannot see (default {DEFAULT_HEADROOM})")
    p.add_argument("--text-tokens", type=int, default=DEFAULT_TEXT_TOKENS,
                   help=f"text tokens per prompt besides audio and image (default {DEFAULT_TEXT_TOKENS}, the paper's prompts)")
    p.add_argument("--json", dest="json_out", default=None, metavar="FILE", help="also write the estimate as JSON to FILE")
    p.set_defaults(func=cmd_plan)

    p = sub.add_parser("plot", help="draw reward / accuracy / length curves of a run folder to a PNG")
    p.add_argument("run_dir", help="a run folder written by `train` (holds metrics.jsonl)")
    p.add_argument("--out", default=None, help="PNG to write (default: RUN_DIR/curves.png)")
    p.set_defaults(func=cmd_plot)

    p = sub.add_parser("tiny", help="build the offline tiny Qwen2.5-Omni model folder (for tests and trials)")
    p.add_argument("out", help="folder to write the model, tokenizer and processor to (the layout of the "
                   "Qwen/Qwen2.5-Omni-7B Hub repository: thinker + talker + token2wav)")
    p.add_argument("--thinker-only", action="store_true",
                   help="the thinker alone, as `merge --format thinker` and transformers' save_pretrained write it")
    p.add_argument("--full", action="store_true", help=argparse.SUPPRESS)  # the default now; kept for old scripts
    p.set_defaults(func=cmd_tiny)
    return parser


class Terminated(KeyboardInterrupt):
    """SIGTERM (a cloud or batch scheduler stopping the job, `kill`), raised like Ctrl-C so that every cleanup
    runs: a half-written output folder is removed, the run folder's lock released. Without it Python dies at
    once and leaves hidden `.OUT.partial-*` folders and a stale lock behind."""


def _raise_terminated(signum, frame):
    raise Terminated()


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import signal
    import threading

    if threading.current_thread() is threading.main_thread():  # signal handlers can only be set there
        signal.signal(signal.SIGTERM, _raise_terminated)
    args = parse_args(build_parser(), argv)
    from .checkpoints import CheckpointError
    from .data import DataError
    from .grpo import TrainingError
    from .jsonl import JsonlError
    from .modeling import ModelLoadError, configure_torch_threads
    from .recipe import RecipeError
    from .rewards import RewardError
    from .safe_output import OutputError

    try:
        configure_torch_threads()  # ECHOINK_THREADS, else OMP_NUM_THREADS, else the usable CPUs
    except ValueError as err:
        print(f"echoink-lite {args.command}: error: {err}", file=sys.stderr)
        return 2
    try:
        return int(args.func(args) or 0)
    except (RecipeError, DataError, CheckpointError, JsonlError, TrainingError, ModelLoadError, OutputError,
            RewardError) as err:
        print(f"echoink-lite {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as err:
        how, code = ("terminated (SIGTERM)", 143) if isinstance(err, Terminated) else ("interrupted", 130)
        what = {"train": "complete checkpoints are kept; continue with --resume auto",
                "eval": "the predictions written so far are kept; the same command continues from them"}.get(
            args.command, "rerun the command")
        print(f"{how}: {what}", file=sys.stderr)
        return code


if __name__ == "__main__":
    sys.exit(main())
