"""Total variation distance: TVD = 0.5 * sum_v |P_T(v) - P_S(v)|, in [0, 1].

Bounded and symmetric; its gradient does not grow where either distribution is tiny.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field
from torch import Tensor

from merge_distill.losses.base import LossConfigBase
from merge_distill.losses.registry import DIVERGENCES


class TVDConfig(LossConfigBase):
    """Total variation distance."""

    kind: Literal["tvd"] = Field("tvd", description="Total variation distance 0.5 * sum |p_target - p_student|.")


@DIVERGENCES.register("tvd", TVDConfig, "total variation 0.5 * sum |p_target - p_student|")
def tvd(student_logprobs: Tensor, target_logprobs: Tensor, config: LossConfigBase) -> Tensor:
    """[N, V] x [N, V] -> [N] (dtype of the inputs). exp(-inf) = 0, so zero-probability tokens
    need no guard; |x|'s subgradient at 0 is 0."""
    return 0.5 * (torch.exp(target_logprobs) - torch.exp(student_logprobs)).abs().sum(dim=-1)
