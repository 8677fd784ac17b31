"""`echoink-lite data check PATH [--report FILE]`: every row of a split checked and fully decoded, with a report.

Why this module exists: training and evaluation skip and count bad rows, but the place to find them all, in
one list, is before a multi-hour run. The check is the same `data.scan_split` that training and evaluation
run (headers only), plus a full decode of every row's media with the limits of the processor and model
(`row_media.load_example`), since headers can look fine while the data is truncated. It prints a summary
table and the first rejects, and writes every reject as JSON Lines (`write_reject_report`) when asked.

Exit codes: 0 every row usable; 1 bad rows (or a list file that cannot be parsed); 2 the check could not
run (unreadable path, unwritable report).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable

from .data import DataError, MediaError, Reject, Row, SplitReadError, scan_split
from .row_media import load_example


def write_reject_report(rejects: Iterable[Reject], path: str | Path) -> Path:
    """JSON Lines, one reject per line: problem_id, reason, detail, index. Written whole (a temporary file and a
    rename), and only over a report of its own (`safe_output`): never over a dataset file."""
    from .safe_output import REJECT_REPORT, write_output

    text = "".join(json.dumps(reject.to_json(), ensure_ascii=False) + "\n" for reject in rejects)
    return write_output(path, text, REJECT_REPORT, "--report")


# Exit codes of `data check` (also in its --help).
CHECK_OK, CHECK_BAD_ROWS, CHECK_IO_ERROR = 0, 1, 2


def _report_write_problem(report: Path) -> str | None:
    """Why the report file cannot be written, or None. Checked before the (long) decode of every row,
    without creating anything yet: a folder, an unwritable place, or a file that is not an earlier report."""
    from .safe_output import REJECT_REPORT, OutputError, check_output_file

    try:
        check_output_file(report, REJECT_REPORT, "--report")
    except OutputError as err:
        return str(err)
    return None


def check_command(path: str | Path, report: str | Path | None = None, console=None) -> int:
    """Check a split end to end: every row, then a full decode of its media with the limits of the
    processor and model. Returns 0 if every row is usable, 1 if some rows (or the whole list file) are
    unusable, 2 if the check itself could not run: the path does not exist or cannot be read, or the
    report cannot be written. Errors are one line naming the path.

    A list file that cannot be parsed at all returns 1 (no report is written then: there are no rows to list).
    """
    from rich.console import Console
    from rich.markup import escape
    from rich.progress import Progress
    from rich.table import Table

    errors = console or Console(stderr=True)  # an error goes to stderr, the report to stdout
    console = console or Console()

    def error(message: str) -> None:
        errors.print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)

    report = Path(report).expanduser() if report is not None else None
    problem = _report_write_problem(report) if report is not None else None
    if report is not None and report.resolve() == Path(path).expanduser().resolve():
        problem = f"--report {report} is the data being checked; pass another path, e.g. bad_rows.jsonl"
    if problem:
        error(problem)
        return CHECK_IO_ERROR
    try:
        scan = scan_split(path, open_media=True)
    except SplitReadError as err:
        error(str(err))
        return CHECK_IO_ERROR
    except DataError as err:
        error(str(err))
        return CHECK_BAD_ROWS

    # Headers can look fine while the data is truncated: decode everything once, with the limits.
    usable: list[Row] = []
    with Progress(console=console, transient=True) as progress:
        task = progress.add_task("decoding media", total=len(scan.rows))
        for row in scan.rows:
            try:
                load_example(row)
                usable.append(row)
            except MediaError as err:
                scan.rejects.append(Reject(row.index, row.problem_id, err.reason, err.detail))
            progress.advance(task)
    scan.rows = usable
    scan.rejects.sort(key=lambda r: r.index)

    console.print(f"data check: {escape(str(scan.source_file))}", highlight=False)
    table = Table()
    table.add_column("")
    table.add_column("rows", justify="right")
    table.add_row("read", str(scan.total))
    table.add_row("usable", str(len(scan.rows)))
    table.add_row("rejected", str(len(scan.rejects)))
    for reason, n in scan.counts_by_reason().items():
        table.add_row(f"  {reason}", str(n))
    console.print(table)

    if report is not None:
        from .safe_output import OutputError

        try:
            written = write_reject_report(scan.rejects, report)
        except OutputError as err:
            error(str(err))
            return CHECK_IO_ERROR
        console.print(f"reject report: {written} ({len(scan.rejects)} lines)")

    shown = 5
    for reject in scan.rejects[:shown]:
        # escape(): details quote user data, which may contain [brackets] rich would read as markup.
        pid = escape(repr(reject.problem_id))
        console.print(f"[red]{reject.reason}[/] problem_id={pid}: {escape(reject.detail)}", highlight=False)
    if len(scan.rejects) > shown:
        more = f"; see {report}" if report is not None else "; pass --report FILE to list them all"
        console.print(f"... and {len(scan.rejects) - shown} more{more}")
    if not scan.rejects:
        console.print("[green]all rows usable[/]")
    return CHECK_OK if not scan.rejects else CHECK_BAD_ROWS
