"""Progress with an ETA for every long phase, in a terminal and in logs alike.

One context manager, `phase_progress`, used by every long phase (warm start, evaluation, training):

    with phase_progress("warm start", total=250, console=console) as advance:
        for step in range(250):
            ...
            advance(1, note=f"loss {loss:.3f}")

- In a terminal it draws a rich progress bar: description, bar, done/total, elapsed, ETA and the last note.
- Anywhere else (a log file, a pipe, Colab or Jupyter output) a live bar is either invisible or floods the
  output, so it prints one plain line at the first update, then at most one every `every_s` seconds, and
  one at the end:  `warm start  25/250 (10%)  elapsed 0:47  ETA 7:03  loss 0.812`.

The ETA is the mean time per unit measured in this phase times the units left; with `start` (a resumed
run), only the units done in this session count. `enabled=False` (e.g. on non-main ranks) turns it into a
no-op with the same API. `advance` also carries `.done`, `.total` and `.eta_s()` for callers that print
their own lines.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from typing import Callable, Iterator

from rich.console import Console
from rich.markup import escape


def format_seconds(seconds: float | None) -> str:
    """`h:mm:ss` or `m:ss`; `-:--` when unknown."""
    if seconds is None:
        return "-:--"
    seconds = int(round(max(0.0, seconds)))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


class Advance:
    """The callable a phase hands out: `advance(n=1, note=None)` records n more units done."""

    def __init__(self, description: str, total: int, start: int, clock: Callable[[], float]):
        self.description, self.total, self.start = description, total, start
        self.done = start
        self.note: str | None = None
        self._clock = clock
        self.started_at = clock()
        self._listeners: list[Callable[[], None]] = []

    def __call__(self, n: int = 1, note: str | None = None) -> None:
        self.done = min(self.total, self.done + n)
        if note is not None:
            self.note = note
        for listener in self._listeners:
            listener()

    def elapsed_s(self) -> float:
        return self._clock() - self.started_at

    def eta_s(self) -> float | None:
        """Seconds left at this phase's measured pace; None before the first unit."""
        done_here = self.done - self.start
        if done_here <= 0:
            return None
        return self.elapsed_s() / done_here * (self.total - self.done)

    def line(self) -> str:
        pct = 100 * self.done / self.total if self.total else 100.0
        width = len(str(self.total))
        text = (f"{self.description}  {self.done:>{width}}/{self.total} ({pct:.0f}%)  "
                f"elapsed {format_seconds(self.elapsed_s())}  ETA {format_seconds(self.eta_s())}")
        return f"{text}  {self.note}" if self.note else text


def live_display(console: Console) -> bool:
    """A live bar only where it renders in place: an interactive terminal, not Jupyter/Colab or a dumb one."""
    return console.is_terminal and not console.is_jupyter and not console.is_dumb_terminal


@contextmanager
def phase_progress(description: str, total: int, console: Console | None = None, *, start: int = 0,
                   every_s: float = 30.0, enabled: bool = True, live: bool | None = None,
                   clock: Callable[[], float] = time.monotonic) -> Iterator[Advance]:
    """Progress of one phase of `total` units; yields `advance(n=1, note=None)`.

    `live` forces the bar (True) or the line printer (False); by default the console decides.
    `every_s` is the line printer's minimum gap between lines.
    """
    console = console or Console()
    advance = Advance(description, total, start, clock)
    if not enabled or total <= 0:
        yield advance
        return
    if live if live is not None else live_display(console):
        yield from _live_bar(advance, console)
    else:
        yield from _plain_lines(advance, console, every_s)


def _live_bar(advance: Advance, console: Console) -> Iterator[Advance]:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    with Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
        TextColumn("ETA"), TimeRemainingColumn(), TextColumn("{task.fields[note]}"), console=console,
    ) as progress:
        task = progress.add_task(escape(advance.description), total=advance.total, completed=advance.start, note="")
        advance._listeners.append(lambda: progress.update(task, completed=advance.done, note=escape(advance.note or "")))
        yield advance


def _plain_lines(advance: Advance, console: Console, every_s: float) -> Iterator[Advance]:
    last_printed: list[float | None] = [None]
    last_done = [advance.done]

    def emit() -> None:
        console.print(escape(advance.line()), highlight=False, soft_wrap=True)
        last_printed[0], last_done[0] = advance._clock(), advance.done

    def maybe_emit() -> None:
        now = advance._clock()
        finished = advance.done == advance.total and advance.done != last_done[0]
        if last_printed[0] is None or now - last_printed[0] >= every_s or finished:
            emit()

    advance._listeners.append(maybe_emit)
    yield advance
    if advance.done != last_done[0]:  # the end of a phase cut short, or units done since the last line
        emit()
