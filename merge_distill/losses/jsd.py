"""Generalized Jensen-Shannon divergence, scaled so that it interpolates forward and reverse KL.

Convention (T = target, S = student, 0 <= beta <= 1):

    M_beta  = beta * P_T + (1 - beta) * P_S
    JSD_beta = [beta * KL(T || M) + (1 - beta) * KL(S || M)] / (beta * (1 - beta))
             = KL(T || M) / (1 - beta) + KL(S || M) / beta

The bracket is the generalized JSD of Agarwal et al. (GKD); dividing it by beta * (1 - beta)
makes the endpoints meaningful: as beta -> 0, M -> P_S and KL(S || M) = O(beta^2), so
JSD -> KL(T || S) (forward KL); as beta -> 1, JSD -> KL(S || T) (reverse KL). At beta = 0 and
beta = 1 we return forward_kl / reverse_kl exactly (the limits), so the function is continuous
on [0, 1]. At beta = 0.5 the value is 4x the textbook JSD.

Numerics. Near the endpoints one of the two terms is a 0/0 limit: KL(S || M) / beta with
KL(S || M) = O(beta^2). Computing log M - log S as a difference of two logs would leave an
absolute error of eps * |log P_S| per token, which the 1/beta then blows up. Instead we compute
the log-ratios directly, each as one logaddexp whose arguments are already ratios:

    u = log(M / P_S) = logaddexp(log(1 - beta), log(beta) + log P_T - log P_S)
    v = log(M / P_T) = logaddexp(log(beta), log(1 - beta) + log P_S - log P_T)

so that JSD_beta = -sum_v [P_S * u / beta + P_T * v / (1 - beta)]. The terms linear in beta
cancel analytically (sum_v P_S u = -KL(S || M) = O(beta^2)), and the rounding error stays
O(eps) at any beta instead of O(eps / beta).
For 0 < beta < 1 the mixture M >= (1 - beta) P_S > 0, so no floor is needed: a target
probability of exactly 0 is harmless.
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
from merge_distill.losses.reverse_kl import kl_student_target


class JSDConfig(LossConfigBase):
    """Generalized JSD between forward KL (beta = 0) and reverse KL (beta = 1)."""

    kind: Literal["jsd"] = Field("jsd", description="Generalized Jensen-Shannon divergence.")
    beta: float = Field(
        0.5, ge=0.0, le=1.0,
        description="Mixture weight of the target in M = beta*P_target + (1-beta)*P_student; "
        "0 is exactly forward KL, 1 is exactly reverse KL, 0.5 is 4x the symmetric JSD.",
    )


def generalized_jsd(student_logprobs: Tensor, target_logprobs: Tensor, beta: float) -> Tensor:
    """JSD_beta per row (module docstring): [N, V] x [N, V] -> [N], dtype of the inputs."""
    if beta <= 0.0:
        return kl_target_student(student_logprobs, target_logprobs)
    if beta >= 1.0:
        return kl_student_target(student_logprobs, target_logprobs)
    log_beta, log_one_minus_beta = math.log(beta), math.log1p(-beta)
    # Student log-probs are finite (log_softmax of finite logits). A -inf target log-prob only
    # enters a ratio that is then multiplied by its own (exactly 0) probability; making it 0
    # first keeps that product 0 * finite = 0 and its gradient finite. The constants are 0-dim
    # tensors (they broadcast without an [N, V] copy), and each side is finished before the
    # other starts so that fewer chunk x V temporaries are alive at once.

    # Student side: u = log(M / P_S); a -inf target log-prob gives u = log(1 - beta), which is right.
    ratio = target_logprobs - student_logprobs
    log_m_over_s = torch.logaddexp(scalar_like(log_one_minus_beta, ratio), ratio.add_(log_beta))
    student_side = (torch.exp(student_logprobs) * log_m_over_s).sum(dim=-1) / beta
    del ratio, log_m_over_s

    # Target side: v = log(M / P_T), only used where P_T > 0.
    ratio = student_logprobs - torch.where(torch.isneginf(target_logprobs), 0.0, target_logprobs)
    log_m_over_t = torch.logaddexp(scalar_like(log_beta, ratio), ratio.add_(log_one_minus_beta))
    target_side = (torch.exp(target_logprobs) * log_m_over_t).sum(dim=-1) / (1.0 - beta)
    return -(student_side + target_side)


@DIVERGENCES.register("jsd", JSDConfig, "generalized JSD(beta): forward KL at 0, reverse KL at 1")
def jsd(student_logprobs: Tensor, target_logprobs: Tensor, config: JSDConfig) -> Tensor:
    """[N, V] x [N, V] -> [N] (dtype of the inputs): JSD_beta per token."""
    return generalized_jsd(student_logprobs, target_logprobs, config.beta)
