"""The router interface.

A router turns cheap per-token teacher signals into blend weights [B, T, K] that sum to 1
over teachers at every valid position and are 0 at masked positions. It never sees full
vocabulary distributions (those stay in the chunked blend), so routing costs O(B*T*K).
"""

from __future__ import annotations

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


class Router(nn.Module):
    """Base class. Subclasses implement `raw_weights`; `forward` applies top_k, floor and the mask."""

    needs_hidden: bool = False

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

    def forward(self, inputs: RouterInputs) -> Tensor:
        raise NotImplementedError  # filled in by routing/__init__.py's shared wrapper
