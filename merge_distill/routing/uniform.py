"""Uniform router: every teacher gets the same weight at every token.

    w_k = 1 / K
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field
from torch import Tensor

from merge_distill.routing.base import Router, RouterConfigBase, RouterInputs
from merge_distill.routing.registry import ROUTERS


class UniformRouterConfig(RouterConfigBase):
    kind: Literal["uniform"] = Field("uniform", description="Every teacher weighs 1/K at every token.")


@ROUTERS.register("uniform", UniformRouterConfig, "w_k = 1/K: plain average of the teachers")
class UniformRouter(Router):
    needs = frozenset()

    def raw_weights(self, inputs: RouterInputs) -> Tensor:
        """-> [B, T, K] float32, all entries 1/K."""
        B, T = inputs.mask.shape
        K = self.num_teachers
        return torch.full((B, T, K), 1.0 / K, dtype=torch.float32, device=inputs.mask.device)
