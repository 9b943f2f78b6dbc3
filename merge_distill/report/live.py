"""Live training display: a progress bar plus one line of metrics and routing shares.

Used by the training loop on rank 0:

    with LiveDisplay(total_steps, teacher_names, enabled=is_main_process) as live:
        for step in range(1, total_steps + 1):
            ...
            live.update(step, metrics)  # the same dict that goes to metrics.jsonl

In a terminal it draws a rich Progress bar (step/total, elapsed, ETA) with the metrics line
under it. When the console is not a terminal (CI logs, `| tee`), a live bar would print
control codes, so it prints one plain line every `refresh_every` steps instead. With
enabled=False (non-zero ranks) it prints nothing at all.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping
from types import TracebackType
from typing import Any

from rich.console import Console, RenderableType
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.text import Text

from merge_distill.report.charts import fmt_count, fmt_duration, fmt_num, fmt_pct


class _ProgressWithLine(Progress):
    """rich Progress that draws one extra line of text under the bar."""

    line: Text = Text("")

    def get_renderables(self) -> Iterable[RenderableType]:
        yield self.make_tasks_table(self.tasks)
        yield self.line


def metrics_line(metrics: Mapping[str, Any], teacher_names: list[str]) -> str:
    """'loss 2.345 (div 1.876, ce 3.210) | 12.3k tok/s | share coder 41.0% writer 33.0% ...'.

    Only the keys present are shown; shares are this step's mean routing weight per teacher."""
    parts = []
    if metrics.get("loss") is not None:
        detail = [f"{short} {fmt_num(metrics[key])}" for key, short in (("divergence", "div"), ("ce", "ce"))
                  if metrics.get(key) is not None]
        parts.append(f"loss {fmt_num(metrics['loss'])}" + (f" ({', '.join(detail)})" if detail else ""))
    if metrics.get("tokens_per_s") is not None:
        parts.append(f"{fmt_count(metrics['tokens_per_s'])} tok/s")
    share = metrics.get("share") or {}
    if share:
        names = teacher_names + [t for t in share if t not in teacher_names]
        parts.append("share " + " ".join(f"{t} {fmt_pct(share.get(t))}" for t in names if t in share))
    return " | ".join(parts)


class LiveDisplay:
    """Context manager showing training progress; see the module docstring.

    `step` passed to update() is the number of optimizer steps done (1 after the first step),
    so step == total_steps means finished. A resumed run may start above 1; the ETA is then
    measured from the first step this display saw.
    """

    def __init__(self, total_steps: int, teacher_names: list[str], console: Console | None = None,
                 refresh_every: int = 5, enabled: bool = True):
        if refresh_every < 1:
            raise ValueError(f"refresh_every must be >= 1, got {refresh_every}")
        self.total_steps = total_steps
        self.teacher_names = list(teacher_names)
        self.console = console if console is not None else Console()
        self.refresh_every = refresh_every
        self.enabled = enabled
        self.live = enabled and self.console.is_terminal and not self.console.is_dumb_terminal
        self._progress: _ProgressWithLine | None = None
        self._task_id: Any = None
        self._first: tuple[int, float] | None = None  # (step, monotonic time) at the first update
        self._last_step = 0
        self._last_line: str | None = None
        self._printed_step = 0

    def __enter__(self) -> "LiveDisplay":
        if self.live:
            self._progress = _ProgressWithLine(
                TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(), TextColumn("steps"),
                TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(),
                console=self.console, transient=False,
            )
            self._progress.line = Text("waiting for the first step")
            self._task_id = self._progress.add_task("train", total=self.total_steps)
            self._progress.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        if not self.enabled:
            return
        if self._progress is not None:
            self._progress.stop()
        elif self._last_line is not None and self._printed_step != self._last_step:
            # The run stopped between two refreshes: print where it got to.
            self.console.print(Text(self._plain(self._last_step, self._last_line)), soft_wrap=True)

    def _eta(self, step: int) -> float | None:
        """Seconds left, from the mean time per step since the first update."""
        if self._first is None or step <= self._first[0]:
            return None
        per_step = (time.monotonic() - self._first[1]) / (step - self._first[0])
        return per_step * max(self.total_steps - step, 0)

    def _plain(self, step: int, line: str) -> str:
        pct = f" ({100 * step / self.total_steps:.0f}%)" if self.total_steps else ""
        eta = self._eta(step)
        eta_text = f" | eta {fmt_duration(eta)}" if eta is not None and step < self.total_steps else ""
        return f"step {step}/{self.total_steps}{pct} | {line}{eta_text}"

    def update(self, step: int, metrics: Mapping[str, Any]) -> None:
        """Record that `step` optimizer steps are done, with that step's metrics.jsonl record.

        The bar moves every step; the metrics line (and, off-terminal, a printed line) is
        refreshed every `refresh_every` steps and at the last step."""
        if not self.enabled:
            return
        if self._first is None:
            self._first = (step, time.monotonic())
        self._last_step = step
        self._last_line = metrics_line(metrics, self.teacher_names)
        due = step % self.refresh_every == 0 or step >= self.total_steps
        if self._progress is not None:
            if due or step == self._first[0]:  # also fill the line at once on the first step
                self._progress.line = Text(self._last_line)
            self._progress.update(self._task_id, completed=step)
        elif due:
            self.console.print(Text(self._plain(step, self._last_line)), soft_wrap=True)
            self._printed_step = step
