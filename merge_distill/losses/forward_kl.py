"""Forward KL: KL(target || student) = sum_v P_target(v) * (log P_target(v) - log P_student(v)).

Mode-covering: the student is pushed to put mass wherever the target has some.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field
from torch import Tensor

from merge_distill.losses.base import LossConfigBase
from merge_distill.losses.registry import DIVERGENCES


class ForwardKLConfig(LossConfigBase):
    """KL(target || student)."""

    kind: Literal["forward_kl"] = Field(
        "forward_kl", description="KL(target || student): mode-covering, the classic distillation loss."
    )


def kl_target_student(student_logprobs: Tensor, target_logprobs: Tensor) -> Tensor:
    """sum_v P_t (log P_t - log P_s) per row: [N, V] x [N, V] -> [N].

    Tokens where the target log-prob is -inf (probability exactly 0) contribute exactly 0.
    The -inf is replaced by 0 *before* the subtraction so that neither the forward value
    (0 * -inf) nor the backward pass (which multiplies by the unselected branch) sees a NaN.
    """
    support = torch.isfinite(target_logprobs)
    safe_target = torch.where(support, target_logprobs, torch.zeros_like(target_logprobs))
    target_probs = torch.exp(target_logprobs)  # exactly 0 where the log-prob is -inf
    terms = target_probs * (safe_target - student_logprobs)
    # If the student log-prob is -inf where the target has no mass, 0 * inf would be NaN.
    terms = torch.where(support, terms, torch.zeros_like(terms))
    return terms.sum(dim=-1)


@DIVERGENCES.register("forward_kl", ForwardKLConfig, "KL(target || student), mode-covering")
def forward_kl(student_logprobs: Tensor, target_logprobs: Tensor, config: LossConfigBase) -> Tensor:
    """[N, V] x [N, V] -> [N] (dtype of the inputs): KL(target || student) per token."""
    return kl_target_student(student_logprobs, target_logprobs)
