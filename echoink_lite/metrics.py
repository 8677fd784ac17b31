"""Watching a run: metrics.jsonl, optional trackers (tensorboard / wandb), and the curves PNG.

`metrics.jsonl` in the run folder is the source of truth: one JSON object per optimizer step. On resume,
lines of steps after the checkpoint (written by the interrupted run) are dropped so the file stays one
consistent history; a last line cut short by a crash is dropped too. `echoink-lite plot RUN_DIR` redraws
`curves.png` from it at any time.
"""

from __future__ import annotations

import json
import math
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .jsonl import JsonlError, read_jsonl


class MetricsWriter:
    """Appends one line per step to metrics.jsonl (main process only). `resume_step` 0 starts the file afresh;
    otherwise lines after that step are dropped. A write that fails (a full disk) raises a one-line SaveError."""

    def __init__(self, run_dir: Path, report_to: list[str], run_name: str | None, resume_step: int = 0,
                 config: dict | None = None, note: Callable[[str], None] | None = None):
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / "metrics.jsonl"
        self._note = note or (lambda message: print(f"warning: {message}", file=sys.stderr))
        self._truncate_after(resume_step)
        self._tb = None
        self._wandb = None
        if "tensorboard" in report_to:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(log_dir=str(Path(run_dir) / "tensorboard"))
            except ImportError as err:
                raise RuntimeError("logging.report_to has tensorboard but it is not installed: pip install tensorboard") from err
        if "wandb" in report_to:
            try:
                import wandb
            except ImportError as err:
                raise RuntimeError("logging.report_to has wandb but it is not installed: pip install wandb") from err
            self._wandb = wandb.init(name=run_name, config=config, resume="allow")

    def _truncate_after(self, step: int) -> None:
        from .checkpoints import ResumeError

        if not self.path.is_file():
            return
        kept: list[Any] = []
        if step > 0:
            try:
                records, torn = read_jsonl(self.path)
            except JsonlError as err:
                raise ResumeError(str(err)) from None
            if torn:
                self._note(torn)
            kept = [r for r in records if isinstance(r, dict) and r.get("step", 0) <= step]
        tmp = self.path.with_name(".metrics.jsonl.tmp")  # replaced in one rename: never half a history
        self._write(tmp, "w", "".join(json.dumps(r) + "\n" for r in kept))
        os.replace(tmp, self.path)

    def _write(self, path: Path, mode: str, text: str) -> None:
        from .checkpoints import SaveError, latest_checkpoint, write_failure_message

        try:
            with open(path, mode, encoding="utf-8") as f:
                f.write(text)
        except OSError as err:
            raise SaveError(write_failure_message(err, path, latest_checkpoint(self.run_dir))) from None

    def log(self, record: dict[str, Any]) -> None:
        self._write(self.path, "a", json.dumps(record) + "\n")
        step = record.get("step", 0)
        numeric = {k: v for k, v in record.items() if isinstance(v, (int, float)) and k != "step"}
        if self._tb is not None:
            for k, v in numeric.items():
                self._tb.add_scalar(k, v, step)
        if self._wandb is not None:
            self._wandb.log(numeric, step=step)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: is {run_dir} a run folder written by `echoink-lite train`?")
    return read_jsonl(path)[0]  # a last line cut short by a crash is left out


def smooth(values: list[float | None], window: int) -> list[float]:
    """Trailing mean over the last `window` logged values (missing ones skipped); NaN where none exists yet."""
    out = []
    for i in range(len(values)):
        recent = [v for v in values[max(0, i - window + 1):i + 1] if v is not None and math.isfinite(v)]
        out.append(sum(recent) / len(recent) if recent else float("nan"))
    return out


def _run_recipe(run_dir: Path) -> dict[str, Any]:
    """The run's saved recipe.yaml as a plain dict ({} when absent or unreadable: the plot does not need it)."""
    import yaml

    try:
        data = yaml.safe_load((run_dir / "recipe.yaml").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return {}
    return data if isinstance(data, dict) else {}


def draw_curves(rows: list[dict[str, Any]], recipe: dict[str, Any], run_name: str):
    """The run's curves as a matplotlib Figure: total reward, sampled training accuracy and format rate,
    completion length, and the fraction of groups that carry no learning signal. Each panel shows the raw
    per-step value and a smoothed line over it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    grpo, gen = recipe.get("grpo") or {}, recipe.get("generation") or {}
    weights = grpo.get("rewards") or {}
    try:
        terms = " + ".join(f"{float(w):g} x {name}" for name, w in weights.items())
        # each built-in reward is 0 or 1 per completion, so the total's maximum is the sum of the weights
        builtin = bool(weights) and set(weights) <= {"accuracy", "format"}
        reward_max = sum(max(0.0, float(w)) for w in weights.values()) if builtin else None
    except (TypeError, ValueError, AttributeError):  # a hand-edited recipe.yaml: draw without the maximum
        terms, reward_max = "", None
    sampling = f"temperature {gen.get('temperature', '?')}, top_p {gen.get('top_p', '?')}" if gen else "sampled"

    steps = [r.get("step") for r in rows]
    window = max(3, len(rows) // 10)
    panels = [
        ("total reward" + (f" (max {reward_max:g} = {terms})" if reward_max is not None else (f" ({terms})" if terms else "")),
         "mean reward per completion", [("reward", "reward")], reward_max),
        (f"sampled TRAINING accuracy and format ({sampling})", "fraction of completions",
         [("accuracy", "accuracy on training prompts"), ("format_rate", "format correct")], 1.0),
        ("completion length", "tokens per completion", [("completion_length", "mean length")], None),
        ("groups with identical rewards (advantage 0: no learning signal)", "fraction of prompts' groups",
         [("zero_std_fraction", "every completion of the prompt got the same reward")], 1.0),
    ]
    fig, axes = plt.subplots(2, 2, figsize=(11, 7.5))
    for ax, (title, ylabel, series, top) in zip(axes.flat, panels):
        for i, (key, label) in enumerate(series):
            ys = [r.get(key) for r in rows]
            if not any(y is not None for y in ys):
                continue
            color = f"C{i}"
            ax.plot(steps, [y if y is not None else float("nan") for y in ys], color=color, alpha=0.3, lw=1,
                    label=f"{label}, per step")
            ax.plot(steps, smooth(ys, window), color=color, lw=2, label=f"{label}, mean of last {window} steps")
        if top is not None:
            ax.axhline(top, color="grey", ls="--", lw=0.8)
        if top == 1.0:  # a fraction
            ax.set_ylim(-0.02, 1.05)
        ax.set_title(title, fontsize=9.5)
        ax.set_xlabel("optimizer step")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7.5)
        else:
            ax.text(0.5, 0.5, "no steps logged yet", ha="center", va="center", transform=ax.transAxes)
    recipe_line = recipe.get("description") or "recipe.yaml not found in the run folder"
    if grpo:
        recipe_line += (f"\n{grpo.get('prompts_per_step')} prompts x {grpo.get('group_size')} completions per step, "
                        f"lr {(recipe.get('schedule') or {}).get('learning_rate')}, KL beta {grpo.get('beta')}")
    fig.suptitle(f"{run_name}: {recipe_line}", fontsize=10.5)
    fig.tight_layout()
    return fig


class MetricsFileError(ValueError):
    """A metrics.jsonl whose plotted values are not numbers; the message names the file and the step."""


PLOTTED = ("step", "reward", "accuracy", "format_rate", "completion_length", "zero_std_fraction")


def check_plottable(rows: list[Any], path: Path) -> None:
    """MetricsFileError (one line) for an entry that is not an object or a plotted value that is not a number."""
    for number, row in enumerate(rows, start=1):
        if not isinstance(row, dict):
            raise MetricsFileError(f"{path}: entry {number} is not a JSON object; metrics.jsonl holds one object per "
                                   "step as `echoink-lite train` writes it. Fix: remove that line.")
        for key in PLOTTED:
            value = row.get(key)
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
                raise MetricsFileError(f"{path}: entry {number} (step {row.get('step', '?')}) has {key} = "
                                       f"{json.dumps(value)[:40]}, not a number. Fix: correct or remove that line.")


def curves_path(run_dir: Path, out: str | Path | None) -> Path:
    """Where the PNG goes: RUN_DIR/curves.png by default, FOLDER/curves.png for a folder (existing, or named
    with a trailing slash); anything else must end in .png."""
    from .safe_output import OutputError

    if not out:
        return run_dir / "curves.png"
    text = str(out)
    path = Path(text).expanduser()
    if path.is_dir() or text.endswith(("/", os.sep)):
        return path / "curves.png"
    if path.suffix.lower() != ".png":
        raise OutputError(f"--out {path}: the curves are written as a PNG. Fix: pass a path ending in .png, or a folder.")
    return path


def plot_run(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """Draw the curves of a run folder (its metrics.jsonl and recipe.yaml) to a PNG; returns its path. The PNG
    replaces only an earlier curves PNG (`safe_output`), written whole through a temporary file."""
    import io

    import matplotlib.pyplot as plt

    from .safe_output import CURVES_PNG, PNG_TEXT_KEY, check_output_file, write_output

    run_dir = Path(run_dir)
    rows = read_metrics(run_dir)
    check_plottable(rows, run_dir / "metrics.jsonl")
    out = check_output_file(curves_path(run_dir, out), CURVES_PNG, "--out")
    recipe = _run_recipe(run_dir)
    run_name = (recipe.get("logging") or {}).get("run_name") or run_dir.resolve().name
    fig = draw_curves(rows, recipe, run_name)
    buffer = io.BytesIO()
    try:
        fig.savefig(buffer, format="png", dpi=100, metadata={PNG_TEXT_KEY: "curves"})
    finally:
        plt.close(fig)
    return write_output(out, buffer.getvalue(), CURVES_PNG, "--out")
