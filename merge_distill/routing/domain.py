"""Domain router: weights chosen by the data domain of each row.

    w_k(row) = c[d, k] / sum_j c[d, j]     d = the row's domain tag, c = routing.weights

A domain's entry is either a {teacher: weight} mapping (teachers left out weigh 0) or a bare
teacher name, shorthand for {name: 1}. A row whose domain is not in the mapping uses
`routing.fallback` ("uniform" or a {teacher: weight} mapping); with no fallback it is an error.
"""

from __future__ import annotations

from typing import Literal

import torch
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


def _as_mapping(entry: dict[str, float] | str) -> dict[str, float]:
    """A domain's entry -> {teacher: weight}; a bare teacher name means one-hot."""
    return {entry: 1.0} if isinstance(entry, str) else entry


class DomainRouterConfig(RouterConfigBase):
    kind: Literal["domain"] = Field("domain", description="Per-domain teacher weights.")
    weights: dict[str, dict[str, float] | str] = Field(
        description="Domain tag -> {teacher name: weight >= 0} (normalised per domain; teachers left out "
        "weigh 0), or domain tag -> teacher name (that teacher alone)."
    )
    fallback: Literal["uniform"] | dict[str, float] | None = Field(
        None,
        description="Weights for rows whose domain is not in routing.weights: 'uniform' or "
        "{teacher name: weight}. None = such a row is an error.",
    )

    def check(self, teacher_names: list[str], data_domains: list[str]) -> list[str]:
        problems = super().check(teacher_names, data_domains)
        if not self.weights:
            problems.append("routing.weights is empty; map each data domain to its teacher weights")
        for domain, entry in self.weights.items():
            if isinstance(entry, str) and entry not in teacher_names:
                problems.append(
                    f"routing.weights.{domain} is {entry!r}, which is not a teacher; "
                    f"teachers are: {', '.join(teacher_names)}"
                )
            elif isinstance(entry, dict):
                problems += check_teacher_weights(f"routing.weights.{domain}", entry, teacher_names)
        if isinstance(self.fallback, dict):
            problems += check_teacher_weights("routing.fallback", self.fallback, teacher_names)
        missing = sorted(set(data_domains) - set(self.weights))
        if missing and self.fallback is None:
            problems.append(
                f"routing.weights has no entry for data domain(s) {', '.join(missing)} "
                f"(mapped: {', '.join(sorted(self.weights)) or 'none'}); add them under routing.weights "
                "or declare routing.fallback ('uniform' or a teacher -> weight mapping)"
            )
        return problems


@ROUTERS.register("domain", DomainRouterConfig, "w = c[domain]: per-domain teacher weights from the recipe")
class DomainRouter(Router):
    needs = frozenset()

    def __init__(self, config: DomainRouterConfig, teacher_names: list[str], hidden_size: int):
        super().__init__(config, teacher_names, hidden_size)
        self.domain_index = {domain: i for i, domain in enumerate(config.weights)}
        rows = [weight_vector(_as_mapping(e), self.teacher_names) for e in config.weights.values()]
        K = self.num_teachers
        if config.fallback == "uniform":
            rows.append(torch.full((K,), 1.0 / K))
        elif isinstance(config.fallback, dict):
            rows.append(weight_vector(config.fallback, self.teacher_names))
        # table [D (+1 fallback), K] float32; row i is domain i's normalised weights.
        self.register_buffer("table", torch.stack(rows), persistent=False)

    def row_index(self, domains: list[str]) -> list[int]:
        """Domain tag per row -> index into `table`; unknown tags map to the fallback row."""
        fallback = len(self.domain_index) if self.config.fallback is not None else None  # type: ignore[attr-defined]
        out = []
        for row, domain in enumerate(domains):
            if domain in self.domain_index:
                out.append(self.domain_index[domain])
            elif fallback is not None:
                out.append(fallback)
            else:
                raise ValueError(
                    f"row {row} has domain {domain!r}, which is not in routing.weights "
                    f"(mapped: {', '.join(self.domain_index)}) and no routing.fallback is declared; "
                    "add it under routing.weights or declare routing.fallback"
                )
        return out

    def raw_weights(self, inputs: RouterInputs) -> Tensor:
        """domains (len B) -> [B, T, K] float32: each row's domain weights at every position."""
        B, T = inputs.mask.shape
        if len(inputs.domains) != B:
            raise ValueError(f"got {len(inputs.domains)} domain tags for a batch of {B} rows")
        index = torch.tensor(self.row_index(inputs.domains), dtype=torch.long)
        per_row = self.table.index_select(0, index.to(self.table.device))   # [B, K]
        return per_row.to(inputs.mask.device).unsqueeze(1).expand(B, T, -1)
