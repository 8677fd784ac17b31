"""JSON Lines files that the kit appends to (metrics.jsonl, eval predictions), read back after a crash.

A process killed while appending leaves at most its LAST line half-written: that line is dropped (and, with
`repair=True`, cut from the file so that strict JSONL readers work again). A line that does not parse
anywhere else was not torn by an append: it is an error naming the file and the line.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any


class JsonlError(ValueError):
    """A JSON Lines file with a broken line that is not the last one; the message names file and line."""


def read_jsonl(path: str | Path, repair: bool = False) -> tuple[list[Any], str | None]:
    """(records, note). `note` says when a torn last line was dropped (and cut from the file if `repair`)."""
    path = Path(path)
    data = path.read_bytes()
    records: list[Any] = []
    offset = 0
    torn_at: int | None = None
    lines = data.split(b"\n")
    for number, raw in enumerate(lines, start=1):
        start, offset = offset, offset + len(raw) + 1
        if not raw.strip():
            continue
        try:
            records.append(json.loads(raw))
        except RecursionError:
            raise JsonlError(f"{path}, line {number}: nested too deeply to read (deeper than Python's recursion limit); "
                             "fix or delete that line.") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            if any(rest.strip() for rest in lines[number:]):
                reason = err.msg if isinstance(err, json.JSONDecodeError) else "not UTF-8"
                raise JsonlError(
                    f"{path}, line {number}: not valid JSON ({reason}). Only a last line can be cut short by a "
                    "crash; fix or delete that line."
                ) from None
            torn_at = start
    if torn_at is None:
        return records, None
    note = f"{path}: dropped a half-written last line (a write cut short by a crash)"
    if repair:
        os.truncate(path, torn_at)
        note += "; removed it from the file"
    return records, note
