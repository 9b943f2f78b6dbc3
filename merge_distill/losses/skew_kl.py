"""Skew forward KL (DistiLLM, Ko et al. 2024):

    SKL_alpha = KL(P_T || alpha * P_T + (1 - alpha) * P_S),   0 <= alpha < 1

alpha = 0 is exactly forward KL. Mixing a little of the target into the student keeps the
log-ratio bounded (M >= alpha * P_T, so log(P_T / M) <= -log(alpha)), which tames the gradient
where the student puts almost no mass on a likely target token.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from pydantic import Field
from torch import Tensor

from merge_distill.losses.base import LossConfigBase
from merge_distill.losses.forward_kl import kl_target_student
from merge_distill.losses.registry import DIVERGENCES, scalar_like


class SkewKLConfig(LossConfigBase):
    """KL(target || alpha * target + (1 - alpha) * student)."""

    kind: Literal["skew_kl"] = Field(
        "skew_kl", description="Skew forward KL: KL(target || alpha*target + (1-alpha)*student) (DistiLLM)."
    )
    alpha: float = Field(
        0.1, ge=0.0, lt=1.0,
        description="Share of the target mixed into the student side; 0 is exactly forward KL.",
    )


def skew_forward_kl(student_logprobs: Tensor, target_logprobs: Tensor, alpha: float) -> Tensor:
    """SKL_alpha per row: [N, V] x [N, V] -> [N], dtype of the inputs."""
    if alpha <= 0.0:
        return kl_target_student(student_logprobs, target_logprobs)
    # v = log(M / P_T) = logaddexp(log alpha, log(1 - alpha) + log P_S - log P_T), computed as
    # one logaddexp of a ratio (no difference of two large logs); SKL = -sum_v P_T * v.
    # Where P_T = 0 the -inf is replaced by 0 first so that 0 * v stays 0 with a finite gradient.
    ratio = student_logprobs - torch.where(torch.isneginf(target_logprobs), 0.0, target_logprobs)
    log_m_over_t = torch.logaddexp(scalar_like(math.log(alpha), ratio), ratio.add_(math.log1p(-alpha)))
    return -(torch.exp(target_logprobs) * log_m_over_t).sum(dim=-1)


@DIVERGENCES.register("skew_kl", SkewKLConfig, "skew forward KL(target || a*target + (1-a)*student)")
def skew_kl(student_logprobs: Tensor, target_logprobs: Tensor, config: SkewKLConfig) -> Tensor:
    """[N, V] x [N, V] -> [N] (dtype of the inputs): skew forward KL per token."""
    return skew_forward_kl(student_logprobs, target_logprobs, config.alpha)
