"""Blending K teacher distributions into one target distribution, per token.

Two modes, both returning log-probabilities of the target (weights w_k >= 0, sum_k w_k = 1):

- mixture:   P = sum_k w_k P_k, computed as log P = logsumexp_k(log w_k + log P_k) so that
  no probability is ever exponentiated and summed (which would underflow to 0 and then give
  log 0 = -inf where the true value is finite). A weight of 0 gives log w = -inf, and the
  teacher drops out exactly; -inf + -inf = -inf is harmless inside logsumexp. A row whose
  weights are all 0 comes out as all -inf (no distribution); the driver gives such rows no loss.
- geometric: P ∝ exp(sum_k w_k log P_k) (a weighted product of experts), computed as
  log_softmax(sum_k w_k log P_k). The convention 0 * (-inf) = 0 applies: a teacher with
  weight 0 has no say even on tokens it rules out. A teacher with weight > 0 that gives a
  token probability 0 vetoes it (the token gets -inf). A row whose weights are all 0 comes out
  uniform (and again carries no loss in the driver).

`blend_logprobs` is the dense formula (all K teachers materialised); `OnlineBlend` computes the
same thing with one teacher in memory at a time, which is what the chunked driver uses.
"""

from __future__ import annotations

import torch
from torch import Tensor

BLEND_MODES: tuple[str, ...] = ("mixture", "geometric")


def check_blend_mode(mode: str) -> None:
    if mode not in BLEND_MODES:
        raise ValueError(f"blend mode {mode!r} is not known; use one of: {', '.join(BLEND_MODES)}")


def blend_logprobs(teacher_logprobs: Tensor, weights: Tensor, mode: str) -> Tensor:
    """Dense blend: teacher_logprobs [K, N, V], weights [N, K] -> target log-probs [N, V].

    The output has the dtype of teacher_logprobs; see the module docstring for the formulas.
    """
    check_blend_mode(mode)
    K, N, V = teacher_logprobs.shape
    if weights.shape != (N, K):
        raise ValueError(f"weights have shape {tuple(weights.shape)}, expected [N, K] = [{N}, {K}]")
    w = weights.to(teacher_logprobs.dtype).t().unsqueeze(-1)  # [K, N, 1]
    if mode == "mixture":
        return torch.logsumexp(teacher_logprobs + torch.log(w), dim=0)
    weighted = torch.where(w > 0, w * teacher_logprobs, torch.zeros_like(teacher_logprobs))
    return torch.log_softmax(weighted.sum(dim=0), dim=-1)


class OnlineBlend:
    """The blend of `blend_logprobs`, accumulated one teacher at a time.

    Peak memory is one accumulator [N, V] plus the teacher being added, whatever K is:
    mixture keeps a running logsumexp (acc <- logaddexp(acc, log w_k + log P_k), in place);
    geometric keeps a running sum of w_k log P_k and normalises once at the end.
    """

    def __init__(self, mode: str, weights: Tensor):
        """weights [N, K]: the blend weights of the rows being accumulated."""
        check_blend_mode(mode)
        self.mode = mode
        self.weights = weights
        self._acc: Tensor | None = None

    def log_weight(self, k: int, dtype: torch.dtype) -> Tensor:
        """log w_k [N, 1] (-inf where the weight is 0)."""
        return torch.log(self.weights[:, k].to(dtype).unsqueeze(-1))

    def add(self, k: int, teacher_logprobs: Tensor, weighted: bool = False) -> None:
        """Fold in teacher k's log-probs [N, V]. The tensor is overwritten (used as scratch).
        weighted (mixture only): it already holds log w_k + log P_k."""
        w = self.weights[:, k].to(teacher_logprobs.dtype).unsqueeze(-1)  # [N, 1]
        if self.mode == "mixture":
            # log w = -inf drops the teacher exactly
            term = teacher_logprobs if weighted else teacher_logprobs.add_(torch.log(w))
            if self._acc is None:
                self._acc = term
            else:
                # logaddexp(-inf, -inf) = -inf in the forward pass; no gradient flows here.
                torch.logaddexp(self._acc, term, out=self._acc)
        else:
            term = teacher_logprobs.mul_(w)
            term.masked_fill_(w == 0, 0.0)  # 0 * (-inf) = NaN -> 0: a zero weight has no say
            if self._acc is None:
                self._acc = term
            else:
                self._acc.add_(term)

    def result(self) -> Tensor:
        """Target log-probs [N, V] (the accumulator itself, normalised in place)."""
        if self._acc is None:
            raise ValueError("OnlineBlend.result() called before any teacher was added")
        acc = self._acc
        if self.mode == "geometric":
            acc.sub_(torch.logsumexp(acc, dim=-1, keepdim=True))
        return acc
