"""LiveDisplay: plain lines off-terminal, a live bar in a terminal, silence when disabled."""

from __future__ import annotations

import re
from io import StringIO

import pytest
from rich.console import Console

from merge_distill.report.live import LiveDisplay, metrics_line

TEACHERS = ["coder", "writer", "solver"]


def row(step: int) -> dict:
    """A metrics.jsonl-shaped record whose figures are easy to recompute from the step."""
    share = {"coder": 0.5 - 0.01 * step, "writer": 0.3, "solver": 0.2 + 0.01 * step}
    return {"step": step, "loss": 3.0 - 0.1 * step, "divergence": 2.0 - 0.05 * step, "ce": 4.0,
            "lr": 1e-4, "tokens": 4096, "tokens_per_s": 1000.0 * step, "elapsed_s": float(step),
            "share": share, "world_size": 1}


def run_display(console: Console, total: int, last: int, refresh_every: int = 5, enabled: bool = True) -> None:
    with LiveDisplay(total, TEACHERS, console=console, refresh_every=refresh_every, enabled=enabled) as live:
        for step in range(1, last + 1):
            live.update(step, row(step))


def plain_console() -> Console:
    return Console(file=StringIO(), force_terminal=False, width=80)


def test_plain_lines_every_refresh_and_at_the_end() -> None:
    console = plain_console()
    run_display(console, total=12, last=12)
    lines = console.file.getvalue().splitlines()
    assert [line.split(" |")[0] for line in lines] == ["step 5/12 (42%)", "step 10/12 (83%)", "step 12/12 (100%)"]
    for line in lines:
        step = int(re.match(r"step (\d+)/", line).group(1))
        r = row(step)
        assert f"loss {r['loss']:.3f} (div {r['divergence']:.3f}, ce 4.000)" in line
        assert f"{r['tokens_per_s'] / 1000:.2f}k tok/s" in line
        shares = " ".join(f"{t} {100 * r['share'][t]:.1f}%" for t in TEACHERS)
        assert f"share {shares}" in line
    assert "eta" in lines[0] and "eta" not in lines[-1]  # nothing left to wait for at the end
    assert "\x1b[" not in console.file.getvalue()


def test_stop_between_refreshes_prints_last_state() -> None:
    console = plain_console()
    with pytest.raises(RuntimeError):
        with LiveDisplay(40, TEACHERS, console=console, refresh_every=5) as live:
            for step in range(1, 8):
                live.update(step, row(step))
            raise RuntimeError("crash at step 8")
    lines = console.file.getvalue().splitlines()
    assert [line.split(" |")[0] for line in lines] == ["step 5/40 (12%)", "step 7/40 (18%)"]


def test_disabled_prints_nothing() -> None:
    for console in (plain_console(), Console(file=StringIO(), force_terminal=True, width=80)):
        run_display(console, total=10, last=10, enabled=False)
        assert console.file.getvalue() == ""


def test_terminal_shows_bar_and_shares() -> None:
    console = Console(file=StringIO(), force_terminal=True, width=120, color_system=None)
    run_display(console, total=12, last=12, refresh_every=5)
    out = console.file.getvalue()
    assert "12/12" in out
    # The last refresh shows the final step's figures.
    assert f"loss {row(12)['loss']:.3f}" in out and "share coder 38.0% writer 30.0% solver 32.0%" in out
    assert "step 5/12" not in out  # no plain log lines in terminal mode


def test_metrics_line_partial_and_extra_teacher() -> None:
    assert metrics_line({"loss": 1.5}, TEACHERS) == "loss 1.500"
    assert metrics_line({"tokens_per_s": 512.0, "share": {"writer": 1.0, "new": 0.0}}, TEACHERS) == (
        "512 tok/s | share writer 100.0% new 0.0%"
    )


def test_refresh_every_must_be_positive() -> None:
    with pytest.raises(ValueError, match="refresh_every"):
        LiveDisplay(10, TEACHERS, refresh_every=0)
