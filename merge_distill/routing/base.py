"""The router interface.

A router turns cheap per-token teacher signals into blend weights [B, T, K] that sum to 1
over teachers at every valid position and are 0 at masked positions. It never sees full
vocabulary distributions (those stay in the chunked blend), so routing costs O(B*T*K).

Every router implements only `raw_weights`; the shared `Router.forward` then applies, in order:

    top_k:  keep the k largest weights per token (ties go to the teacher listed first),
            w <- w * keep / sum(w * keep)
    floor:  w <- (1 - floor) * w + floor / K          (every weight >= floor / K)
    mask:   w <- 0 where mask is False                 (masked rows are all zero)
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor, nn


class RouterConfigBase(BaseModel):
    """Fields every router accepts. Subclasses add `kind: Literal["..."]` and their parameters."""

    model_config = ConfigDict(extra="forbid")

    blend: Literal["mixture", "geometric"] = Field(
        "mixture",
        description="mixture: p = sum_k w_k p_k (computed with logsumexp); "
        "geometric: p ∝ exp(sum_k w_k log p_k).",
    )
    top_k: int | None = Field(
        None, ge=1, description="Keep only the k highest-weighted teachers per token, then renormalise."
    )
    floor: float = Field(
        0.0, ge=0.0, lt=1.0,
        description="Mix the weights with uniform: w <- (1 - floor) w + floor / K, so no teacher reaches exactly 0.",
    )

    def check(self, teacher_names: list[str], data_domains: list[str]) -> list[str]:
        """Cross-section problems (one line each, starting with the key path, e.g.
        `routing.weights has 2 entries but 3 teachers are listed (code, prose, math)`).
        Overridden by routers whose parameters refer to teachers or domains."""
        problems = []
        if self.top_k is not None and self.top_k > len(teacher_names):
            problems.append(
                f"routing.top_k is {self.top_k} but only {len(teacher_names)} teachers are listed; "
                f"use a value from 1 to {len(teacher_names)} or remove it"
            )
        return problems


def check_teacher_weights(key: str, weights: dict[str, float], teacher_names: list[str]) -> list[str]:
    """Problems with a {teacher name -> weight} mapping found at recipe key `key`.

    Reports names that are not teachers, negative or non-finite weights, and an all-zero
    mapping. Teachers absent from the mapping are not reported here (they weigh 0); callers
    that need every teacher listed check that themselves.
    """
    problems = []
    teachers = ", ".join(teacher_names)
    for name, value in weights.items():
        if name not in teacher_names:
            problems.append(f"{key}.{name} is not a teacher; teachers are: {teachers}")
        elif not math.isfinite(value):
            problems.append(f"{key}.{name} is {value}; weights must be finite numbers >= 0")
        elif value < 0:
            problems.append(f"{key}.{name} is {value}; weights must be >= 0 (use 0 to switch a teacher off)")
    if weights and all(v == 0 for v in weights.values()):
        first = teacher_names[0] if teacher_names else "teacher"
        problems.append(
            f"{key} are all 0; give at least one teacher a positive weight (e.g. {key}.{first}: 1.0)"
        )
    elif not weights:
        problems.append(f"{key} is empty; give each teacher a weight >= 0 (teachers are: {teachers})")
    return problems


def weight_vector(weights: dict[str, float], teacher_names: list[str]) -> Tensor:
    """{teacher name -> weight} -> [K] float32 in teacher order, normalised to sum 1.

    Teachers missing from the mapping weigh 0. Raises ValueError if the mapping is invalid
    (see `check_teacher_weights`), so a router never silently builds a bad table.
    """
    problems = check_teacher_weights("weights", weights, teacher_names)
    if problems:
        raise ValueError("; ".join(problems))
    # Normalise in float64 so the float32 result sums to 1 to within one rounding step.
    vec = torch.tensor([float(weights.get(n, 0.0)) for n in teacher_names], dtype=torch.float64)
    return (vec / vec.sum()).float()


@dataclass
class RouterInputs:
    """Everything a router may look at for one micro-batch.

    gold_nll [B, T, K], entropy [B, T, K]: float32 teacher signals (0 where masked).
    mask [B, T] bool: True where there is a target.
    domains: the domain tag per row (len B).
    hidden [B, T, H] float or None: the student's last hidden state, detached.
    """

    gold_nll: Tensor
    entropy: Tensor
    mask: Tensor
    domains: list[str]
    hidden: Tensor | None = None


def keep_top_k(weights: Tensor, k: int) -> Tensor:
    """weights [B, T, K] -> [B, T, K]: zero all but the k largest per token, renormalise.

    A stable descending sort breaks ties deterministically: among equal weights the teacher
    listed first is kept. The kept mass is at least k/K of the row (the k largest of weights
    summing to 1), so the division never meets 0 on a valid row.
    """
    order = torch.sort(weights, dim=-1, descending=True, stable=True).indices
    keep = torch.zeros_like(weights, dtype=torch.bool).scatter_(-1, order[..., :k], True)
    kept = torch.where(keep, weights, torch.zeros_like(weights))
    return kept / kept.sum(-1, keepdim=True).clamp_min(torch.finfo(weights.dtype).tiny)


class Router(nn.Module):
    """Base class. Subclasses implement `raw_weights`; `forward` applies top_k, floor and the mask."""

    # What the router reads from RouterInputs (a subset of sources.SIGNALS); `validate` checks it
    # against what the recipe's teacher source provides. Each router states its own.
    needs: frozenset[str] = frozenset({"gold_nll", "entropy"})

    @property
    def needs_hidden(self) -> bool:
        return "hidden" in self.needs

    def __init__(self, config: RouterConfigBase, teacher_names: list[str], hidden_size: int):
        super().__init__()
        self.config = config
        self.teacher_names = list(teacher_names)
        self.hidden_size = hidden_size

    @property
    def num_teachers(self) -> int:
        return len(self.teacher_names)

    def raw_weights(self, inputs: RouterInputs) -> Tensor:
        """[B, T, K] non-negative weights summing to 1 over K (masking is applied by forward)."""
        raise NotImplementedError  # abstract: each router implements its formula

    def aux_loss(self, inputs: RouterInputs) -> Tensor | None:
        """Sum over valid tokens of the router's own training objective, or None if it has none."""
        return None

    @torch.no_grad()
    def forward(self, inputs: RouterInputs) -> Tensor:
        """inputs -> blend weights [B, T, K] float32.

        Valid rows (mask True) are non-negative and sum to 1; masked rows are all zero. The
        weights are a distillation target, so no gradient flows through them: a router with
        parameters trains only through `aux_loss`.
        """
        B, T = inputs.mask.shape
        K = self.num_teachers
        weights = self.raw_weights(inputs).float()
        if weights.shape != (B, T, K):
            raise ValueError(
                f"{type(self).__name__}.raw_weights returned shape {tuple(weights.shape)}, expected {(B, T, K)}"
            )
        if self.config.top_k is not None and self.config.top_k < K:
            weights = keep_top_k(weights, self.config.top_k)
        if self.config.floor > 0:
            weights = (1.0 - self.config.floor) * weights + self.config.floor / K
        # One final renormalisation absorbs the rounding of the steps above, so valid rows sum
        # to 1 within float32 eps whatever the router produced.
        weights = weights / weights.sum(-1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)
        # torch.where (not multiplication) so a NaN computed on a masked row cannot leak out.
        return torch.where(inputs.mask.unsqueeze(-1), weights, torch.zeros_like(weights))
