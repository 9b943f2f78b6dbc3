"""Fixed router: one constant weight per teacher, the same at every token.

    w_k = c_k / sum_j c_j        (c = routing.weights, one entry per teacher, c_k >= 0)
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field
from torch import Tensor

from merge_distill.routing.base import (
    Router,
    RouterConfigBase,
    RouterInputs,
    check_teacher_weights,
    weight_vector,
)
from merge_distill.routing.registry import ROUTERS


class FixedRouterConfig(RouterConfigBase):
    kind: Literal["fixed"] = Field("fixed", description="Constant per-teacher weights.")
    weights: dict[str, float] = Field(
        description="Teacher name -> weight >= 0, one entry per teacher; normalised to sum 1."
    )

    def check(self, teacher_names: list[str], data_domains: list[str]) -> list[str]:
        problems = super().check(teacher_names, data_domains)
        teachers = ", ".join(teacher_names)
        missing = [n for n in teacher_names if n not in self.weights]
        if self.weights and len(self.weights) != len(teacher_names):
            line = f"routing.weights has {len(self.weights)} entries but {len(teacher_names)} teachers are listed ({teachers})"
            if missing:
                line += f"; add a weight for: {', '.join(missing)}"
            problems.append(line)
        elif self.weights and missing:
            problems.append(
                f"routing.weights has no entry for teacher(s) {', '.join(missing)}; "
                f"give one weight per teacher ({teachers})"
            )
        problems += check_teacher_weights("routing.weights", self.weights, teacher_names)
        return problems


@ROUTERS.register("fixed", FixedRouterConfig, "w_k = c_k / sum c: constant per-teacher weights from the recipe")
class FixedRouter(Router):
    needs = frozenset()

    def __init__(self, config: FixedRouterConfig, teacher_names: list[str], hidden_size: int):
        super().__init__(config, teacher_names, hidden_size)
        self.register_buffer("table", weight_vector(config.weights, self.teacher_names), persistent=False)

    def raw_weights(self, inputs: RouterInputs) -> Tensor:
        """-> [B, T, K] float32: the normalised constant vector at every position."""
        B, T = inputs.mask.shape
        return self.table.to(inputs.mask.device).expand(B, T, -1)
