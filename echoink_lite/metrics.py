"""Watching a run: metrics.jsonl, optional trackers (tensorboard / wandb), and the curves PNG.

`metrics.jsonl` in the run folder is the source of truth: one JSON object per optimizer step. On resume,
lines of steps after the checkpoint (written by the interrupted run) are dropped so the file stays one
consistent history. `echoink-lite plot RUN_DIR` redraws `curves.png` from it at any time.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


class MetricsWriter:
    def __init__(self, run_dir: Path, report_to: list[str], run_name: str | None, resume_step: int = 0, config: dict | None = None):
        self.path = Path(run_dir) / "metrics.jsonl"
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
        if not self.path.is_file():
            return
        kept = [line for line in self.path.read_text().splitlines() if line.strip() and json.loads(line).get("step", 0) <= step]
        self.path.write_text("".join(line + "\n" for line in kept))

    def log(self, record: dict[str, Any]) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
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
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot_run(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """Reward, accuracy, format and completion-length curves to a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_metrics(run_dir)
    out = Path(out) if out else Path(run_dir) / "curves.png"
    steps = [r["step"] for r in rows]
    panels = [
        ("reward (total)", ["reward"]),
        ("accuracy / format", ["accuracy", "format_rate"]),
        ("completion length (tokens)", ["completion_length"]),
        ("groups with no signal", ["zero_std_fraction"]),
    ]
    fig, axes = plt.subplots(2, 2, figsize=(10, 6.5))
    for ax, (title, keys) in zip(axes.flat, panels):
        for k in keys:
            ys = [r.get(k) for r in rows]
            if any(y is not None for y in ys):
                ax.plot(steps, [y if y is not None else float("nan") for y in ys], label=k)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if len(keys) > 1 and ax.get_legend_handles_labels()[0]:
            ax.legend()
    fig.suptitle(f"echoink-lite run: {Path(run_dir).name}")
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out
