"""What an evaluation reports: its result (`EvalResult`, `score`), the summary table, the breakdowns by
task_type and audio_type, and several evaluations side by side.

- **Breakdowns.** AVQA-R1-6K rows carry a question category (``task_type``) and a sound category
  (``audio_type``); the original's ``src/omniInstruct-v1_cal_metrics_valid.py`` (HarryHsing/EchoInk) reports
  accuracy by each besides the overall accuracy. `breakdowns` does the same over the evaluated (row,
  sample) pairs, for each field that at least one row has; rows without it are grouped as "(none)".
- **Side by side.** Three numbers answer "did training work, and does my evaluation match the paper's":
  the base under ``echoink-base`` (the paper: 80.53%), the trained model under ``echoink-rl`` (85.77%) and
  under the kit's strict protocol. `side_by_side` prints the results of several summaries in one table;
  ``python -m echoink_lite.eval_report A.summary.json B.summary.json ...`` does it from a shell.
"""

from __future__ import annotations

import json
import math
import statistics
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable

BREAKDOWN_FIELDS = ("task_type", "audio_type")
NO_VALUE = "(none)"
# The paper's validation accuracies (arXiv 2505.04623, abstract), by the protocol that reproduces each.
PAPER_ACCURACY = {"echoink-base": 80.53, "echoink-rl": 85.77}


@dataclass
class EvalResult:
    label: str
    n_rows: int  # rows with predictions (resumed + new)
    n_samples: int  # (row, sample) predictions
    accuracy: float | None  # mean over all samples; None when nothing could be evaluated
    accuracy_per_sample: list[float]  # accuracy of sample index k over the rows, k = 0..K-1
    accuracy_mean: float | None  # mean of accuracy_per_sample
    accuracy_spread: float | None  # sample standard deviation of accuracy_per_sample (None when K = 1)
    format_failure_rate: float | None
    bad_rows: dict[str, int]  # reason -> rows
    rows_per_second: float | None  # rows generated in this run / seconds; None when all were resumed
    parse_rule: str
    predictions_path: str
    resumed_samples: int = 0
    generated_samples: int = 0
    bad_row_details: list[str] = field(default_factory=list)
    protocol: str = "kit"
    decoding: str = ""  # eval_protocols.Decoding.describe()
    sampling_se: float | None = None  # binomial standard error of one sampled pass (None when greedy)
    rescored_samples: int = 0  # reused lines whose gold answer changed since they were written
    changed_rows: int = 0  # rows with lines of older content (an edited split): generated again
    breakdowns: dict[str, dict[str, dict[str, Any]]] = field(default_factory=dict)  # task_type / audio_type

    @property
    def n_bad_rows(self) -> int:
        return sum(self.bad_rows.values())

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["n_bad_rows"] = self.n_bad_rows
        return out


def score(records: dict[tuple[str, int], dict[str, Any]], row_of: dict[str, Any], samples: int,
          sampled: bool) -> dict[str, Any]:
    """The metric fields of an EvalResult from its prediction lines ((problem_id, sample) -> line) and the rows
    they are for (problem_id -> Row)."""
    per_sample: list[list[bool]] = [[] for _ in range(samples)]
    formats: list[bool] = []
    evaluated_rows = set()
    for (pid, k), rec in records.items():
        per_sample[k].append(bool(rec["correct"]))
        formats.append(bool(rec["format_ok"]))
        evaluated_rows.add(pid)
    n_samples = len(formats)
    accuracy = sum(sum(s) for s in per_sample) / n_samples if n_samples else None
    acc_per_k = [sum(s) / len(s) for s in per_sample if s]
    return {
        "n_rows": len(evaluated_rows),
        "n_samples": n_samples,
        "accuracy": accuracy,
        "accuracy_per_sample": acc_per_k,
        "accuracy_mean": statistics.fmean(acc_per_k) if acc_per_k else None,
        "accuracy_spread": statistics.stdev(acc_per_k) if len(acc_per_k) > 1 else None,
        "format_failure_rate": (1 - sum(formats) / n_samples) if n_samples else None,
        # one sampled pass over n rows: the binomial standard error sqrt(p (1 - p) / n)
        "sampling_se": math.sqrt(accuracy * (1 - accuracy) / len(evaluated_rows)) if sampled and n_samples else None,
        "breakdowns": breakdowns((row_of[pid], rec) for (pid, _k), rec in records.items()),
    }


def breakdowns(pairs: Iterable[tuple[Any, dict[str, Any]]]) -> dict[str, dict[str, dict[str, Any]]]:
    """field -> value -> {"rows", "samples", "accuracy"} over (row, prediction line) pairs; only the fields
    some row has. Accuracy is over samples, as the overall accuracy is."""
    pairs = list(pairs)
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for name in BREAKDOWN_FIELDS:
        if not any(getattr(row, name, None) for row, _ in pairs):
            continue
        groups: dict[str, dict[str, Any]] = {}
        for row, rec in pairs:
            group = groups.setdefault(getattr(row, name, None) or NO_VALUE, {"rows": set(), "samples": 0, "correct": 0})
            group["rows"].add(str(row.problem_id))
            group["samples"] += 1
            group["correct"] += bool(rec["correct"])
        out[name] = {value: {"rows": len(g["rows"]), "samples": g["samples"], "accuracy": g["correct"] / g["samples"]}
                     for value, g in sorted(groups.items())}
    return out


def pct(x: float | None) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.2f}%"


def print_summary(results: list, console, difference_pp: float | None = None) -> None:
    """The evaluation table (one row per result), its protocol and decoding, the breakdowns, the bad rows."""
    from rich.markup import escape
    from rich.table import Table

    table = Table(title="evaluation")
    for name, justify in (("label", "left"), ("rows", "right"), ("accuracy", "right"), ("format failures", "right"),
                          ("bad rows", "right"), ("rows/s", "right")):
        table.add_column(name, justify=justify)
    for r in results:
        acc = pct(r.accuracy)
        if r.accuracy_spread is not None:
            acc += f" ± {100 * r.accuracy_spread:.2f} pp (K={len(r.accuracy_per_sample)})"
        bad = str(r.n_bad_rows)
        if r.bad_rows:
            bad += " (" + ", ".join(f"{k}: {v}" for k, v in r.bad_rows.items()) + ")"
        rate = "-" if r.rows_per_second is None else f"{r.rows_per_second:.2f}"
        table.add_row(r.label, str(r.n_rows), acc, pct(r.format_failure_rate), bad, rate)
    console.print(table)
    for protocol in dict.fromkeys((r.protocol, r.parse_rule, r.decoding) for r in results):
        console.print("protocol {} (parse rule {}); decoding: {}".format(*map(escape, protocol)), highlight=False)
    for r in results:
        if r.sampling_se is not None:
            console.print(f"{escape(r.label)}: one sampled pass over {r.n_rows} rows has a standard error of about "
                          f"{100 * r.sampling_se:.2f} pp; --samples K reports the mean of K passes and their spread",
                          highlight=False)
    for name in BREAKDOWN_FIELDS:
        with_field = [r for r in results if name in r.breakdowns]
        if not with_field:
            continue
        sub = Table(title=f"accuracy by {name}")
        sub.add_column(name, justify="left")
        for r in with_field:
            sub.add_column(f"{r.label} (rows)", justify="right")
        values = sorted({v for r in with_field for v in r.breakdowns[name]})
        for value in values:
            cells = []
            for r in with_field:
                group = r.breakdowns[name].get(value)
                cells.append("-" if group is None else f"{pct(group['accuracy'])} ({group['rows']})")
            sub.add_row(value, *cells)
        console.print(sub)
    if difference_pp is not None:
        console.print(f"adapter - base: {difference_pp:+.2f} percentage points", highlight=False)
    shown = 5
    details = results[0].bad_row_details if results else []
    for line in details[:shown]:
        console.print(f"[red]bad row[/] {escape(line)}", highlight=False)
    if len(details) > shown:
        console.print(f"... and {len(details) - shown} more bad rows; run `echoink-lite data check` to list them")
    if results:
        console.print(f"predictions: {escape(results[0].predictions_path)}", highlight=False)


def summary_path(predictions_path: str | Path) -> Path:
    p = Path(predictions_path)
    return p.with_name(p.stem + ".summary.json")


def split_name(data: str | Path) -> str:
    """The name of a split for reports: its folder's name (".../avqa/valid" -> "valid"), also when given
    as the AVQA list inside it, else the file's stem. Never a local path."""
    p = Path(data)
    if p.suffix.lower() in (".json", ".jsonl"):
        return p.parent.name if p.name.startswith("omni_rl_format") and p.parent.name else p.stem
    return p.name or str(data)


def side_by_side(summaries: list[dict[str, Any]], console, names: list[str] | None = None) -> list[dict[str, Any]]:
    """One table with the results of several eval summaries (dicts as `run_eval` returns and writes them), each
    with its protocol, decoding and, where one exists, the paper's number for that protocol. Returns the rows."""
    from rich.table import Table

    rows = []
    for i, summary in enumerate(summaries):
        for result in summary["results"]:
            protocol = summary.get("protocol", {}).get("name", result.get("protocol", "?"))
            rows.append({
                "name": (names[i] if names else None) or f"{result['label']}",
                "model": summary.get("evaluated_model") or summary.get("base_model") or "?",
                "protocol": protocol,
                "decoding": summary.get("protocol", {}).get("decoding", ""),
                "rows": result["n_rows"],
                "accuracy": result["accuracy"],
                "spread": result.get("accuracy_spread"),
                "paper": PAPER_ACCURACY.get(protocol),
            })
    table = Table(title="evaluations side by side")
    for column in ("", "model", "protocol", "rows", "accuracy", "the paper (same protocol)"):
        table.add_column(column)
    for row in rows:
        acc = pct(row["accuracy"]) + (f" ± {100 * row['spread']:.2f} pp" if row["spread"] is not None else "")
        paper = "-" if row["paper"] is None else f"{row['paper']:.2f}% (full fine-tune)" if row["protocol"] == "echoink-rl" else f"{row['paper']:.2f}%"
        table.add_row(row["name"], str(row["model"]), row["protocol"], str(row["rows"]), acc, paper)
    console.print(table)
    return rows


def main(argv: list[str] | None = None) -> int:
    """`python -m echoink_lite.eval_report SUMMARY.json ...`: the summaries' results side by side."""
    from rich.console import Console

    paths = list(sys.argv[1:] if argv is None else argv)
    if not paths:
        print("usage: python -m echoink_lite.eval_report PREDICTIONS.summary.json [...]", file=sys.stderr)
        return 2
    summaries = []
    for path in paths:
        try:
            summaries.append(json.loads(Path(path).read_text(encoding="utf-8")))
        except (OSError, ValueError) as err:
            print(f"eval_report: error: cannot read {path} ({err}); pass the .summary.json an eval wrote", file=sys.stderr)
            return 2
        if not isinstance(summaries[-1], dict) or "results" not in summaries[-1]:
            print(f"eval_report: error: {path} is not an eval summary (no 'results'); pass the .summary.json an eval "
                  "wrote", file=sys.stderr)
            return 2
    side_by_side(summaries, Console())
    return 0


if __name__ == "__main__":
    sys.exit(main())
