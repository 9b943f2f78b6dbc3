"""Reverse KL: KL(student || target) = sum_v P_student(v) * (log P_student(v) - log P_target(v)).

Mode-seeking: the student is pushed to put its mass where the target is large and is
punished for any mass where the target is small.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field
from torch import Tensor

from merge_distill.losses.base import LossConfigBase
from merge_distill.losses.registry import DIVERGENCES

# Where the target gives a token probability exactly 0 (log-prob -inf), reverse KL is +inf as
# soon as the student puts any mass there, and its gradient is NaN (inf - inf). We clamp target
# log-probs from below at this floor instead: far below anything finite logits of realistic
# size produce (it needs a logit gap of 10^6), so finite inputs are untouched, while -inf
# becomes a very large but finite penalty P_student(v) * (log P_student(v) + 10^6).
LOGPROB_FLOOR = -1.0e6


class ReverseKLConfig(LossConfigBase):
    """KL(student || target)."""

    kind: Literal["reverse_kl"] = Field(
        "reverse_kl", description="KL(student || target): mode-seeking, as in on-policy distillation."
    )


def kl_student_target(student_logprobs: Tensor, target_logprobs: Tensor) -> Tensor:
    """sum_v P_s (log P_s - max(log P_t, LOGPROB_FLOOR)) per row: [N, V] x [N, V] -> [N].

    Student log-probs are finite (log_softmax of finite logits), so P_s > 0 in exact arithmetic;
    where exp underflows to 0 the term is 0 * finite = 0.
    """
    terms = student_logprobs - target_logprobs.clamp(min=LOGPROB_FLOOR)
    return (torch.exp(student_logprobs) * terms).sum(dim=-1)


@DIVERGENCES.register("reverse_kl", ReverseKLConfig, "KL(student || target), mode-seeking")
def reverse_kl(student_logprobs: Tensor, target_logprobs: Tensor, config: LossConfigBase) -> Tensor:
    """[N, V] x [N, V] -> [N] (dtype of the inputs): KL(student || target) per token."""
    return kl_student_target(student_logprobs, target_logprobs)
