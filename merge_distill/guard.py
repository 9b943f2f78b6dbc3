"""The non-finite policy of a training step, in one place.

NaN/inf in a teacher's log-probs, the loss, the router's loss or the gradient norm is caught on
the micro-batch where it appears. Every process takes the same decision (one all-reduce per
micro-batch), so they stay in lockstep: the step's update is not applied, its statistics are
dropped, and `problems` says what and from which sources. Two cases differ:

- fp16 overflow: DeepSpeed's/accelerate's loss scaler skipped the update itself. Routine: the
  step counts as skipped, never as a reason to stop.
- fatal: under DeepSpeed gradients accumulate inside its engine from the first backward of a
  step, and the update happens inside backward, before the gradient norm can be checked. A
  problem found after any backward of the step (a later micro-batch, or the gradient norm)
  cannot be undone, so the run must stop. A problem in the first micro-batch's forward, before
  any backward, is skipped like everywhere else.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TypeVar

from accelerate import Accelerator

from merge_distill import distributed as dist_mod
from merge_distill.errors import NonFiniteError

T = TypeVar("T")


class StepGuard:
    def __init__(self, accelerator: Accelerator):
        self.accelerator = accelerator
        self.problems: list[str] = []
        self.backward_done = False  # set by the step after each backward

    @property
    def failed(self) -> bool:
        return bool(self.problems)

    def forward(self, compute: Callable[[], T], finite: Callable[[T], str | None], sources: list[str]) -> T | None:
        """Run one micro-batch's forward; None (and a recorded problem) when it, or the same
        micro-batch on another process, met NaN/inf. `finite(result)` names what is not finite."""
        where = f"(sources: {', '.join(sorted(set(sources)))})"
        result: T | None = None
        try:
            result = compute()
            problem = finite(result)
            problem = f"{problem} {where}" if problem else None
        except NonFiniteError as exc:
            problem = f"{exc} {where}"
        if dist_mod.global_sum(self.accelerator, float(problem is not None)) > 0:
            self.problems.append(problem or "NaN/inf on another process")
            return None
        return result

    def gradients_ok(self, norm: object, sources: list[str]) -> bool:
        """After clipping: a NaN/inf norm (without a loss scaler, which handles it) fails the step."""
        if norm is not None and not math.isfinite(float(norm)) and self.accelerator.scaler is None:
            self.problems.append(f"the gradient norm is NaN/inf (sources: {', '.join(sorted(set(sources)))})")
            return False
        return True

    def fatal(self) -> bool:
        """Whether a failed step already changed DeepSpeed's state (a backward ran in this step)."""
        return self.backward_done and dist_mod.uses_deepspeed(self.accelerator)
