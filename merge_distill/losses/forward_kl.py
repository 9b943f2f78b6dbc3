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

    Tokens where the target log-prob is -inf (probability exactly 0) contribute exactly 0: the
    -inf is replaced by 0 *before* the subtraction, so the term is 0 * finite and neither the
    forward value (0 * -inf) nor the backward pass sees a NaN. Student log-probs are finite
    (log_softmax of finite logits), as everywhere in this package.
    """
    target_probs = torch.exp(target_logprobs)
    # Built in place on one fresh [N, V] tensor: this runs on chunks of vocabulary-sized rows,
    # and every extra temporary is another chunk x V floats.
    terms = torch.where(torch.isneginf(target_logprobs), 0.0, target_logprobs)
    terms.sub_(student_logprobs)
    return terms.mul_(target_probs).sum(dim=-1)


@DIVERGENCES.register("forward_kl", ForwardKLConfig, "KL(target || student), mode-covering")
def forward_kl(student_logprobs: Tensor, target_logprobs: Tensor, config: LossConfigBase) -> Tensor:
    """[N, V] x [N, V] -> [N] (dtype of the inputs): KL(target || student) per token."""
    return kl_target_student(student_logprobs, target_logprobs)
