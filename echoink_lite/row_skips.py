"""When rows skipped during training must stop the run, and what to say when steps go non-finite.

A row that passes the scan before training can still fail when the loop loads and encodes it (media that
decode badly or to NaN, a prompt over the cap); `step_data.step_prompts` skips it, counts it and takes the
next row of the data order. Two situations turn that into a run that trains on nothing, or on far less than
the data, while reporting success. Both stop the run with a `TrainingError`:

1. a step with no prompt left: every row it could take was skipped;
2. more unusable rows than `data.max_bad_fraction` allows. The share is counted as `data.enforce_bad_fraction`
   counts it before training, over the rows the run draws from:
       (rows the scan rejected + rows skipped while loading so far) / rows read.
   Skips only add to it, so it is a lower bound of the true share, and the run stops as soon as the bound
   passes the limit: at once for data that is broken throughout (with every row bad, after
   max_bad_fraction x rows + 1 skips), never on an early, unlucky row of data that is fine on the whole.
   With `data.limit_train_rows` the rows read are the first rows of the split up to the last one the run uses.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class SkipBudget:
    rows_read: int  # rows of the split the run draws from, rejected ones included
    rejected_by_scan: int  # of those, rows the scan before training rejected
    max_bad_fraction: float
    split: str  # for the fix: `echoink-lite data check SPLIT`

    @classmethod
    def for_run(cls, scan, rows: list, max_bad_fraction: float) -> "SkipBudget":
        """The budget of a run over `rows` (the scan's usable rows, cut by data.limit_train_rows)."""
        if rows and len(rows) < len(scan.rows):
            last = rows[-1].index
            rejected = sum(1 for r in scan.rejects if r.index < last)
            return cls(len(rows) + rejected, rejected, max_bad_fraction, str(scan.split_dir))
        return cls(scan.total, len(scan.rejects), max_bad_fraction, str(scan.split_dir))

    def problem(self, skipped: int, by_reason: dict[str, int]) -> str | None:
        """Why `skipped` rows skipped while loading exceed the budget, or None."""
        bad = self.rejected_by_scan + skipped
        share = bad / max(1, self.rows_read)
        if share <= self.max_bad_fraction:
            return None
        scan_part = f" and {self.rejected_by_scan} rejected by the scan before training" if self.rejected_by_scan else ""
        return (f"{skipped} training rows could not be loaded so far ({_reasons(by_reason)}){scan_part}: {bad} of "
                f"{self.rows_read} rows are unusable, {share:.1%} > data.max_bad_fraction {self.max_bad_fraction:.1%}. "
                f"Fix: repair or remove those rows (`echoink-lite data check {self.split}` lists them) and train again, "
                "or raise data.max_bad_fraction and resume with --resume auto")


def no_prompt_left(skipped: int, by_reason: dict[str, int], split: str) -> str:
    return (f"no prompt left to train on: every row this step could take was skipped ({skipped} rows so far: "
            f"{_reasons(by_reason)}). Fix: repair or remove those rows (`echoink-lite data check {split}` lists them) "
            "and train again")


def _reasons(by_reason: dict[str, int]) -> str:
    return ", ".join(f"{reason}: {n}" for reason, n in sorted(by_reason.items(), key=lambda kv: -kv[1])) or "none"


def nonfinite_rows_note(streak: list[list[str]]) -> str:
    """What the rows of a streak of non-finite steps say (problem ids per step, oldest first): the rows that
    were in every one of them, which makes a row's data a likely cause, and the rows of the last one."""
    if not streak:
        return ""
    note = f" Rows of the last non-finite step: {', '.join(streak[-1])}."
    common = sorted(set.intersection(*(set(s) for s in streak))) if len(streak) > 1 else []
    if common:
        note = (f" Row(s) {', '.join(common)} were in each of these {len(streak)} steps: their data may be the cause "
                f"(`echoink-lite data check` decodes them; remove them and train again).") + note
    return note
