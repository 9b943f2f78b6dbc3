"""Cross-entropy router: trust the teachers that predicted the gold token well.

    NLL_k = -log p_k(gold)                    (per token, from RouterInputs.gold_nll)
    tau > 0:  w_k = softmax_k(-NLL / tau)     (AvgCE-like soft weighting)
    tau = 0:  w_k = [NLL_k == min_j NLL_j] / #argmin   (MinCE: hard pick, ties split evenly)

softmax(-NLL / tau) subtracts the row maximum before exponentiating, so it is stable for any
tau > 0 and tends to the tau = 0 rule as tau -> 0 (exactly tied teachers share evenly in both).

granularity = "sequence" replaces NLL_k at every token by the row's mean over its valid
tokens, NLL_k(row) = sum_t mask * NLL_k / sum_t mask (FuseLLM's sequence-level MinCE/AvgCE),
so each row gets one weight vector, broadcast over its positions.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field
from torch import Tensor

from merge_distill.routing.base import Router, RouterConfigBase, RouterInputs
from merge_distill.routing.registry import ROUTERS


class CERouterConfig(RouterConfigBase):
    kind: Literal["ce"] = Field("ce", description="Weights from each teacher's NLL of the gold token.")
    tau: float = Field(
        1.0, ge=0.0,
        description="Temperature in nats: w ∝ exp(-NLL / tau); 0 = hard pick of the lowest-NLL teacher (MinCE).",
    )
    granularity: Literal["token", "sequence"] = Field(
        "token",
        description="token: weigh every position by its own NLL; sequence: by each row's mean NLL "
        "over its valid tokens, one weight vector per row.",
    )


def hard_argmin(nll: Tensor) -> Tensor:
    """nll [..., K] -> [..., K]: 1/n on the n teachers that share the minimum, 0 elsewhere."""
    is_min = (nll == nll.min(dim=-1, keepdim=True).values).float()
    return is_min / is_min.sum(-1, keepdim=True)


@ROUTERS.register("ce", CERouterConfig, "w ∝ exp(-NLL_k / tau), tau=0 picks the argmin: trust teachers that knew the gold token")
class CERouter(Router):
    needs = frozenset({"gold_nll"})

    def raw_weights(self, inputs: RouterInputs) -> Tensor:
        """gold_nll [B, T, K], mask [B, T] -> [B, T, K] float32."""
        config: CERouterConfig = self.config  # type: ignore[assignment]
        nll = inputs.gold_nll.float()
        if config.granularity == "sequence":
            mask = inputs.mask.unsqueeze(-1).float()                       # [B, T, 1]
            count = mask.sum(dim=1, keepdim=True).clamp_min(1.0)           # [B, 1, 1]
            row_nll = (nll * mask).sum(dim=1, keepdim=True) / count        # [B, 1, K]
            nll = row_nll.expand_as(nll)
        if config.tau == 0:
            return hard_argmin(nll)
        return torch.softmax(-nll / config.tau, dim=-1)
