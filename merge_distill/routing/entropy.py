"""Entropy router: trust the teachers that are confident at this token.

    H_k = -sum_v p_k(v) log p_k(v)            (teacher k's entropy, nats, from RouterInputs)
    w_k = exp(-H_k / tau) / sum_j exp(-H_j / tau) = softmax_k(-H / tau)

Small tau approaches a hard pick of the least uncertain teacher; large tau approaches uniform.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field
from torch import Tensor

from merge_distill.routing.base import Router, RouterConfigBase, RouterInputs
from merge_distill.routing.registry import ROUTERS


class EntropyRouterConfig(RouterConfigBase):
    kind: Literal["entropy"] = Field("entropy", description="Per-token weights from teacher entropy.")
    tau: float = Field(
        1.0, gt=0.0,
        description="Temperature in nats: w ∝ exp(-entropy / tau). Smaller = sharper preference for confident teachers.",
    )


@ROUTERS.register("entropy", EntropyRouterConfig, "w ∝ exp(-H_k / tau): trust confident (low-entropy) teachers")
class EntropyRouter(Router):
    needs = frozenset({"entropy"})

    def raw_weights(self, inputs: RouterInputs) -> Tensor:
        """entropy [B, T, K] -> [B, T, K] float32; softmax subtracts the max, so any tau is stable."""
        tau = self.config.tau  # type: ignore[attr-defined]
        return torch.softmax(-inputs.entropy.float() / tau, dim=-1)
