"""Progress with an ETA: a live bar in a terminal, throttled plain lines elsewhere, used by the warm start."""

import io

from rich.console import Console

from echoink_lite.progress import format_seconds, phase_progress


class FakeClock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


def plain_console():
    return Console(file=io.StringIO(), width=200)  # not a terminal: the line printer


def lines_of(console):
    return console.file.getvalue().splitlines()


def test_format_seconds():
    assert [format_seconds(s) for s in (None, 0, 59.6, 61, 3723)] == ["-:--", "0:00", "1:00", "1:01", "1:02:03"]


def test_plain_lines_first_then_throttled_then_last_with_eta():
    clock, console = FakeClock(), plain_console()
    with phase_progress("warm start", total=10, console=console, every_s=3, clock=clock) as advance:
        for i in range(10):
            clock.now += 1.0
            advance(1, note=f"loss {1 / (i + 1):.3f}")
    assert lines_of(console) == [
        "warm start   1/10 (10%)  elapsed 0:01  ETA 0:09  loss 1.000",
        "warm start   4/10 (40%)  elapsed 0:04  ETA 0:06  loss 0.250",
        "warm start   7/10 (70%)  elapsed 0:07  ETA 0:03  loss 0.143",
        "warm start  10/10 (100%)  elapsed 0:10  ETA 0:00  loss 0.100",
    ]


def test_a_phase_cut_short_still_prints_where_it_stopped():
    clock, console = FakeClock(), plain_console()
    with phase_progress("eval", total=10, console=console, every_s=60, clock=clock) as advance:
        for _ in range(3):
            clock.now += 2.0
            advance(1)
    assert lines_of(console) == ["eval   1/10 (10%)  elapsed 0:02  ETA 0:18", "eval   3/10 (30%)  elapsed 0:06  ETA 0:14"]


def test_resumed_phase_estimates_from_this_sessions_pace():
    clock, console = FakeClock(), plain_console()
    with phase_progress("GRPO", total=20, console=console, start=10, clock=clock) as advance:
        clock.now += 4.0
        advance(2)
        assert (advance.done, advance.eta_s()) == (12, 16.0)


def test_disabled_prints_nothing_and_still_counts():
    console = plain_console()
    with phase_progress("GRPO", total=3, console=console, enabled=False) as advance:
        advance(2)
    assert advance.done == 2 and console.file.getvalue() == ""


def test_terminal_gets_a_live_bar_with_eta():
    console = Console(file=io.StringIO(), force_terminal=True, width=120)
    with phase_progress("warm start", total=4, console=console) as advance:
        for _ in range(4):
            advance(1, note="loss 0.5")
    out = console.file.getvalue()
    assert "warm start" in out and "4/4" in out and "ETA" in out and "loss 0.5" in out
    assert "elapsed" not in out  # the bar, not the line printer


def test_warm_start_reports_progress_with_eta(tiny_model_dir, synth_dir, tmp_path):
    from echoink_lite.warmstart import warm_start

    console = plain_console()
    warm_start(tiny_model_dir, synth_dir / "train", tmp_path / "warm", steps=2, batch_size=2, console=console)
    lines = lines_of(console)
    assert any(line.startswith("warm start: encode prompts ") and "ETA" in line for line in lines)
    assert lines[-1].startswith("warm start  2/2 (100%)") and "ETA 0:00  loss " in lines[-1]
