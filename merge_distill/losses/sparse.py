"""The loss driver for sparse teacher targets (top-k log-probs plus tail mass, from the cache).

Each teacher j gives, per token, its k largest log-probs at the loss temperature T on token ids
S_j, and tail_j = log of the mass on the V - k tokens it did not list. Nothing else is known, so
the divergence is taken between coarse-grained distributions over buckets:

    buckets = U (the union of the K teachers' top-k ids, |U| <= K*k, one bucket per token)
              + "rest" (the V - |U| other tokens, one bucket)

Teacher j on a bucket:
    v in S_j:        its stored log-prob (exact);
    v in U \\ S_j:    its tail spread evenly over the tokens it did not list,
                     log p_j(v) = tail_j - log(V - k). Every unlisted token has at most the
                     teacher's k-th probability, so this average does too: the estimate never
                     outranks a listed token;
    rest:            the same per-token value times V - |U| tokens.
Blend: per token over U and per token inside rest, exactly as the dense blend (mixture:
logsumexp_j(log w_j + log p_j); geometric: normalised sum_j w_j log p_j), then the rest bucket
collects its V - |U| tokens (+ log(V - |U|)) and the result is normalised over the buckets.
Student: exact on the buckets: its log-probs (at T) on U, and logsumexp of its log-probs over
the V - |U| other tokens for rest. The student is never asked to match the *shape* of a tail,
only its total mass.

Properties: with k = V every bucket is one token and there is no rest, so loss and gradient
equal the dense driver's (tested). With one teacher the teacher side is exact (no estimate is
used: U = S_1). With several teachers the estimate enters only where a token is in one
teacher's top-k and not in another's.

Fixed width: U is held as K*k slots sorted by id, a repeated id being a "duplicate" slot. Slots
that are structurally empty (duplicates, and rest when |U| = V) get the finite log-prob
EMPTY_LOGPROB in both student and target: p = q = 0 and a log-ratio of 0, so every registered
divergence and the target entropy get exactly 0 from them (a -inf there would give 0 * inf).

Gradient: the divergence is differentiated w.r.t. the student's bucket log-probs b [c, K*k+1]
with a local graph; the chain to the student's log-probs [c, V] is applied by hand:
d b_u / d log s_v = [v = u] for u in U, d rest / d log s_v = s_v / s_rest for v outside U;
then through log_softmax(logits / T) as in the dense driver. The cross-entropy part and the
backward pass are the dense driver's (`_ChunkedDistill.backward`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from merge_distill.losses.base import LossConfigBase
from merge_distill.losses.blend import OnlineBlend, check_blend_mode
from merge_distill.losses.chunked import DistillOutput, _ChunkedDistill, compute_dtype, target_entropy
from merge_distill.losses.registry import DivergenceFn
from merge_distill.signals import IGNORE_INDEX

EMPTY_LOGPROB = -1.0e4  # exp() is exactly 0 in float32 and float64; finite, so no 0 * inf


def union_slots(topk_ids: list[Tensor], vocab_size: int) -> tuple[Tensor, Tensor, Tensor]:
    """K tensors [c, k] of token ids -> (union [c, K*k] sorted ids, duplicate [c, K*k] bool,
    log_rest_count [c] = log(V - |U|), -inf where the union covers the whole vocabulary)."""
    union = torch.sort(torch.cat(topk_ids, dim=-1), dim=-1).values
    duplicate = torch.zeros_like(union, dtype=torch.bool)
    duplicate[:, 1:] = union[:, 1:] == union[:, :-1]
    rest_count = vocab_size - (~duplicate).sum(dim=-1)
    return union, duplicate, torch.log(rest_count.to(torch.float64))


def teacher_on_slots(ids: Tensor, logprobs: Tensor, tail: Tensor, union: Tensor, vocab_size: int) -> Tensor:
    """One teacher's per-token log-probs on the union slots and inside rest.

    ids [c, k] long, logprobs [c, k] (any float), tail [c] log tail mass, union [c, M] sorted
    -> [c, M + 1] in tail's dtype: column m < M is log p(union[:, m]), column M the per-token value
    in rest. The stored top-k and tail are renormalised together first (values stored in 16 bits
    sum to 1 only up to their rounding).
    """
    k = ids.shape[-1]
    dtype = tail.dtype
    values = logprobs.to(dtype)
    norm = torch.logsumexp(torch.cat([values, tail.unsqueeze(-1)], dim=-1), dim=-1, keepdim=True)
    values = values - norm
    tail = tail.unsqueeze(-1) - norm
    # Per unlisted token: tail / (V - k); with k = V there are none (and no tail mass).
    if vocab_size > k:
        per_token = tail - math.log(vocab_size - k)
    else:
        per_token = torch.full_like(tail, -math.inf)
    order = torch.argsort(ids, dim=-1)
    sorted_ids = ids.gather(-1, order)
    sorted_values = values.gather(-1, order)
    pos = torch.searchsorted(sorted_ids, union).clamp_(max=k - 1)
    listed = sorted_ids.gather(-1, pos) == union
    on_slots = torch.where(listed, sorted_values.gather(-1, pos), per_token)
    return torch.cat([on_slots, per_token], dim=-1)


def sparse_target(
    topk_ids: list[Tensor], topk_logprobs: list[Tensor], tails: list[Tensor], weights: Tensor,
    blend: str, vocab_size: int,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The blended target on the buckets of c tokens.

    topk_ids / topk_logprobs: K tensors [c, k]; tails: K tensors [c] (the compute dtype);
    weights [c, K] -> (target [c, M + 1] log-probs with empty slots at EMPTY_LOGPROB,
    union [c, M], duplicate [c, M], rest_empty [c] bool), M = K * k.
    Rows whose weights are all 0 come out all -inf apart from the empty slots (no loss there).
    """
    union, duplicate, log_rest_count = union_slots(topk_ids, vocab_size)
    online = OnlineBlend(blend, weights)
    for j, (ids, values, tail) in enumerate(zip(topk_ids, topk_logprobs, tails)):
        online.add(j, teacher_on_slots(ids, values, tail, union, vocab_size))
    target = online.result()
    M = union.shape[-1]
    target[:, M] += log_rest_count.to(target.dtype)  # the rest bucket holds V - |U| tokens
    target[:, :M].masked_fill_(duplicate, -math.inf)
    # Normalise over the buckets (geometric: the blend normalised per token, not per bucket;
    # mixture: a no-op up to rounding). A row with no weight keeps its -inf (norm set to 0).
    norm = torch.logsumexp(target, dim=-1, keepdim=True)
    target.sub_(torch.where(torch.isfinite(norm), norm, 0.0))
    rest_empty = torch.isneginf(log_rest_count)
    target[:, :M].masked_fill_(duplicate, EMPTY_LOGPROB)
    target[:, M].masked_fill_(rest_empty, EMPTY_LOGPROB)
    return target, union, duplicate, rest_empty


def student_buckets(logprobs: Tensor, union: Tensor, duplicate: Tensor, rest_empty: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Student log-probs [c, V] -> (buckets [c, M + 1], outside [c, V], rest [c]).

    outside holds the log-probs of the tokens outside U and -inf on U (kept for the gradient);
    rest = logsumexp(outside) is finite-safe: 0 where the rest bucket is empty.
    """
    in_union = torch.zeros_like(logprobs, dtype=torch.bool).scatter_(-1, union, True)
    outside = logprobs.masked_fill(in_union, -math.inf)
    rest = torch.logsumexp(outside, dim=-1)
    rest = torch.where(rest_empty, 0.0, rest)
    on_slots = logprobs.gather(-1, union).masked_fill_(duplicate, EMPTY_LOGPROB)
    buckets = torch.cat([on_slots, rest.masked_fill(rest_empty, EMPTY_LOGPROB).unsqueeze(-1)], dim=-1)
    return buckets, outside, rest


def buckets_to_logprob_grad(
    grad_buckets: Tensor, outside: Tensor, rest: Tensor, union: Tensor, duplicate: Tensor, rest_empty: Tensor
) -> Tensor:
    """d loss / d student log-probs [c, V] from d loss / d buckets [c, M + 1] (see the module
    docstring). Empty slots are constants: their gradient is dropped. `outside` is consumed."""
    M = union.shape[-1]
    grad = torch.zeros_like(outside)
    grad.scatter_add_(-1, union, grad_buckets[:, :M].masked_fill(duplicate, 0.0))
    grad_rest = grad_buckets[:, M].masked_fill(rest_empty, 0.0).unsqueeze(-1)
    # s_v / s_rest = exp(log s_v - rest) outside U; exp(-inf) = 0 on U and in empty rows.
    grad.add_(outside.sub_(rest.unsqueeze(-1)).exp_().mul_(grad_rest))
    return grad


@dataclass
class _SparsePlan:
    """What the autograd function needs besides the student logits (flattened over B*T).
    `targets`, `chunks()` and `compute_ce` are what the shared backward pass reads."""

    topk_ids: list[Tensor]  # K x [B*T, k] long
    topk_logprobs: list[Tensor]  # K x [B*T, k]
    tails: list[Tensor]  # K x [B*T]
    weights: Tensor  # [B*T, K]
    targets: Tensor  # [B*T]
    valid_idx: Tensor  # [N]
    divergence: DivergenceFn
    config: LossConfigBase
    blend: str
    chunk_tokens: int
    compute_ce: bool
    needs_grad: bool
    target_entropy_sum: float = 0.0

    def chunks(self) -> list[Tensor]:
        return list(torch.split(self.valid_idx, self.chunk_tokens))


class _SparseDistill(_ChunkedDistill):
    """Forward as in the dense driver with the target and the divergence on buckets; the
    backward pass (gradient buffer scaling + cross-entropy) is inherited unchanged."""

    @staticmethod
    def forward(ctx: Any, student_logits: Tensor, plan: _SparsePlan) -> tuple[Tensor, Tensor]:  # type: ignore[override]
        ctx.set_materialize_grads(False)
        V = student_logits.shape[-1]
        flat_student = student_logits.reshape(-1, V)
        dtype = compute_dtype(student_logits.dtype)
        temperature = plan.config.temperature
        has_teachers = bool(plan.topk_ids)
        grad_buffer = torch.zeros_like(flat_student) if plan.needs_grad and has_teachers else None
        div_sum = torch.zeros((), dtype=dtype, device=student_logits.device)
        ce_sum = torch.zeros_like(div_sum)
        entropy_sum = torch.zeros_like(div_sum)
        for idx in plan.chunks():
            logprobs = flat_student[idx].to(dtype)
            gold = plan.targets.index_select(0, idx).unsqueeze(-1)
            if plan.compute_ce and temperature != 1.0:
                ce_sum += (torch.logsumexp(logprobs, dim=-1) - logprobs.gather(-1, gold).squeeze(-1)).sum()
            if temperature != 1.0:
                logprobs.div_(temperature)
            logprobs.sub_(torch.logsumexp(logprobs, dim=-1, keepdim=True))
            if plan.compute_ce and temperature == 1.0:
                ce_sum -= logprobs.gather(-1, gold).sum()
            if has_teachers:
                weights = plan.weights.index_select(0, idx).to(dtype)
                target, union, duplicate, rest_empty = sparse_target(
                    [ids[idx] for ids in plan.topk_ids], [values[idx] for values in plan.topk_logprobs],
                    [tail[idx].to(dtype) for tail in plan.tails], weights, plan.blend, V)
                has_weight = weights.sum(dim=-1) > 0
                entropy_sum += torch.where(has_weight, target_entropy(target), 0.0).sum()
                buckets, outside, rest = student_buckets(logprobs, union, duplicate, rest_empty)
                with torch.enable_grad():
                    buckets.requires_grad_(plan.needs_grad)
                    per_token = plan.divergence(buckets, target, plan.config)
                    chunk_loss = torch.where(has_weight, per_token, 0.0).sum() * temperature**2
                    grad_buckets = torch.autograd.grad(chunk_loss, buckets)[0] if plan.needs_grad else None
                div_sum += chunk_loss.detach()
                if grad_buckets is not None:
                    grad = buckets_to_logprob_grad(grad_buckets, outside, rest, union, duplicate, rest_empty)
                    # Through log_softmax(logits / T), in place: (g - softmax * sum_v g) / T.
                    probs = logprobs.exp_()
                    grad.sub_(probs.mul_(grad.sum(dim=-1, keepdim=True)))
                    if temperature != 1.0:
                        grad.div_(temperature)
                    grad_buffer.index_copy_(0, idx, grad.to(grad_buffer.dtype))  # type: ignore[union-attr]
                    del grad, probs
                del target, buckets, outside
            del logprobs
        plan.target_entropy_sum = float(entropy_sum)
        ctx.plan = plan
        ctx.grad_buffer = grad_buffer
        ctx.logits_shape = student_logits.shape
        ctx.backward_done = False
        if plan.compute_ce and plan.needs_grad:
            ctx.save_for_backward(student_logits)
        return div_sum, ce_sum


def sparse_distill_loss(
    student_logits: Tensor,
    topk_ids: list[Tensor],
    topk_logprobs: list[Tensor],
    tail_logprobs: list[Tensor],
    weights: Tensor,
    targets: Tensor,
    divergence: DivergenceFn,
    config: LossConfigBase,
    blend: str = "mixture",
    chunk_tokens: int = 1024,
    compute_ce: bool = True,
) -> DistillOutput:
    """`distill_loss` on sparse teacher targets; same outputs (sums over valid tokens).

    student_logits [B, T, V] (gradient flows to it); per teacher: topk_ids [B, T, k] (int),
    topk_logprobs [B, T, k] log-probs at temperature config.temperature (any float dtype),
    tail_logprobs [B, T] log of the remaining mass at that temperature; weights [B, T, K];
    targets [B, T] (-100 = no target). The teachers' values are NOT divided by the temperature
    again (they were stored at it); the student is, and the divergence is multiplied by T^2.
    target_entropy_sum is the entropy of the blended target over the buckets.
    """
    if student_logits.dim() != 3:
        raise ValueError(f"student_logits must be [B, T, V], got shape {tuple(student_logits.shape)}")
    B, T, V = student_logits.shape
    K = len(topk_ids)
    if not (len(topk_logprobs) == len(tail_logprobs) == K):
        raise ValueError(f"got {K} id tensors, {len(topk_logprobs)} log-prob tensors and {len(tail_logprobs)} tails")
    for j in range(K):
        if topk_ids[j].shape[:2] != (B, T) or topk_logprobs[j].shape != topk_ids[j].shape:
            raise ValueError(f"teacher {j}: top-k ids {tuple(topk_ids[j].shape)} and log-probs "
                             f"{tuple(topk_logprobs[j].shape)} must both be [B, T, k] with [B, T] = [{B}, {T}]")
        if tail_logprobs[j].shape != (B, T):
            raise ValueError(f"teacher {j}: tail has shape {tuple(tail_logprobs[j].shape)}, expected [{B}, {T}]")
        if topk_ids[j].shape[-1] > V:
            raise ValueError(f"teacher {j}: k = {topk_ids[j].shape[-1]} is larger than the vocabulary ({V})")
    if weights.shape != (B, T, K):
        raise ValueError(f"weights have shape {tuple(weights.shape)}, expected [B, T, K] = [{B}, {T}, {K}]")
    if targets.shape != (B, T):
        raise ValueError(f"targets have shape {tuple(targets.shape)}, expected [B, T] = [{B}, {T}]")
    if K == 0 and config.hard_label_weight < 1.0:
        raise ValueError(f"no teachers were given but hard_label_weight is {config.hard_label_weight}")
    if chunk_tokens < 1:
        raise ValueError(f"chunk_tokens must be >= 1, got {chunk_tokens}")
    check_blend_mode(blend)
    flat_targets = targets.reshape(-1)
    plan = _SparsePlan(
        topk_ids=[ids.reshape(B * T, -1).long() for ids in topk_ids],
        topk_logprobs=[values.detach().reshape(B * T, -1) for values in topk_logprobs],
        tails=[tail.detach().reshape(B * T) for tail in tail_logprobs],
        weights=weights.detach().reshape(B * T, K),
        targets=flat_targets,
        valid_idx=(flat_targets != IGNORE_INDEX).nonzero().squeeze(-1),
        divergence=divergence,
        config=config,
        blend=blend,
        chunk_tokens=chunk_tokens,
        compute_ce=compute_ce,
        needs_grad=torch.is_grad_enabled() and student_logits.requires_grad,
    )
    div_sum, ce_sum = _SparseDistill.apply(student_logits, plan)
    return DistillOutput(div_sum, ce_sum, int(plan.valid_idx.numel()), plan.target_entropy_sum)
