"""The loss driver for sparse teacher targets (top-k log-probs plus tail mass, from the cache).

Each teacher j gives, per token, its k largest log-probs at the loss temperature T on token ids
S_j, and tail_j = log of the mass on the V - k tokens it did not list. Nothing else is known, so
the divergence is taken between coarse-grained distributions over buckets:

    buckets = U (the union of the K teachers' top-k ids, |U| <= K*k, one bucket per token)
              + "rest" (the V - |U| other tokens, one bucket)

Teacher j on a bucket:
    v in S_j:        its stored log-prob (exact);
    v in U \\ S_j:    its tail spread evenly over the tokens it did not list,
                     log p_j(v) = tail_j - log(V - n_j), n_j = the distinct ids it lists
                     (k, or fewer after a projection merged some: teacher_table). Every unlisted token has at most the
                     teacher's k-th probability, so this average does too: the estimate never
                     outranks a listed token;
    rest:            the same per-token value times V - |U| tokens.
Blend: per token over U and per token inside rest, exactly as the dense blend (mixture:
logsumexp_j(log w_j + log p_j); geometric: normalised sum_j w_j log p_j), then the rest bucket
collects its V - |U| tokens (+ log(V - |U|)) and the result is normalised over the buckets.
Student: exact on the buckets: its log-probs (at T) on U, and for rest the log of its summed
probability over the V - |U| other tokens. The student is never asked to match the *shape* of a tail,
only its total mass.

Properties: with k = V every bucket is one token and there is no rest, so loss and gradient
equal the dense driver's (tested). With one teacher the teacher side is exact (no estimate is
used: U = S_1). With several teachers the estimate enters only where a token is in one
teacher's top-k and not in another's.

Fixed width: each token of a chunk has M bucket slots (M = the chunk's largest |U| <= K*k): its
|U| distinct ids (in the order the teachers list them; duplicates found with a scatter/gather
through a [c, V] index map, no sort), then empty slots. Structurally empty buckets (those
slots, and rest when |U| = V) get the finite log-prob EMPTY_LOGPROB in both student and
target: p = q = 0 and a log-ratio of 0, so every registered divergence and the target entropy
get exactly 0 from them (a -inf there would give 0 * inf). The teachers' values land in a
[K, c, M+1] table with one scatter.

Cost per chunk of c tokens: the student's softmax over V (needed by any loss) plus O(c * K * k)
for the buckets; no teacher-side work is O(V). Gradient: forward KL in closed form, any other
divergence differentiated w.r.t. the student's bucket log-probs [c, M+1] on a local graph
(`ChunkRun.divergence`); the chain to the logits is applied by hand, in place on the student's
probabilities (`logits_grad`). The cross-entropy part and the backward pass are the dense
driver's (`_ChunkedDistill.backward`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import Tensor

from merge_distill.losses.base import LossConfigBase
from merge_distill.losses.blend import OnlineBlend
from merge_distill.losses.chunked import (
    ChunkRun,
    ChunkSums,
    DistillOutput,
    LossPlan,
    _ChunkedDistill,
    check_common_inputs,
    shared_plan_fields,
)
from merge_distill.losses.registry import DivergenceFn

EMPTY_LOGPROB = -1.0e4  # exp() is exactly 0 in float32 and float64; finite, so no 0 * inf


@dataclass
class Buckets:
    """The bucket layout of c tokens: M bucket slots per token, M = the largest |U| among them
    (at most K * k).

    ids [c, M]: token id of each bucket, distinct ids first (in order of first listing: teacher
    0's top-k, then the ids teacher 1 adds, ...), then empty slots that repeat the row's first
    id (so a scatter through them writes where a real bucket does); empty [c, M] bool;
    rest_empty [c] bool (|U| = V); log_rest_count [c] = log(V - |U|); and, for building the
    teachers' table, the bucket of each input slot (slot j * k + i = teacher j's i-th id).
    """

    ids: Tensor
    empty: Tensor
    rest_empty: Tensor
    log_rest_count: Tensor
    bucket_of_slot: Tensor  # [c, K * k] bucket index of each input slot


def bucket_layout(topk_ids: list[Tensor], vocab_size: int) -> Buckets:
    """K tensors [c, k] of token ids -> the buckets, in O(c * K * k) (no sort).

    An index map [c, V] (only the listed entries are ever written or read, so it is never
    initialised) takes, for each listed id, the first slot that lists it: the slots are
    scattered last to first, so the first write to survive is the first slot. A slot is a new
    bucket where that first slot is itself; buckets are numbered by a running count of those.
    """
    slots = torch.cat(topk_ids, dim=-1).long()  # [c, M]
    c, M = slots.shape
    position = torch.arange(M, dtype=torch.int32, device=slots.device).expand(c, M)
    index_map = torch.empty(c, vocab_size, dtype=torch.int32, device=slots.device)  # int32: half the pages
    index_map.scatter_(-1, slots.flip(-1), position.flip(-1))  # last write wins: the first slot
    first_slot = index_map.gather(-1, slots)  # [c, M]
    is_new = first_slot == position
    bucket_of_new = is_new.cumsum(dim=-1) - 1
    bucket_of_slot = bucket_of_new.gather(-1, first_slot.long())
    n_buckets = bucket_of_new[:, -1:] + 1
    # Width: the largest |U| among these tokens (teachers that agree share ids, so this is often
    # well below K * k); every column past it would be empty in every row.
    width = int(n_buckets.max())
    empty = torch.arange(width, device=slots.device) >= n_buckets
    # A duplicate slot writes the same id as its first listing into the same bucket.
    ids = slots[:, :1].expand(c, width).clone().scatter_(-1, bucket_of_slot, slots)
    rest_count = (vocab_size - n_buckets.squeeze(-1)).to(torch.float64)
    return Buckets(ids, empty, rest_count == 0, torch.log(rest_count), bucket_of_slot)


def teacher_table(buckets: Buckets, topk_logprobs: list[Tensor], tails: list[Tensor], vocab_size: int) -> Tensor:
    """Per-token log-probs of every teacher on the buckets: [K, c, M + 1] in tails' dtype.

    Column m < M: log p_j(ids[:, m]) (stored value, or the teacher's even tail share where it did
    not list the token); column M: the per-token value inside rest. The stored top-k and tail
    are renormalised together first (16-bit values sum to 1 only up to their rounding).

    An entry with log-prob -inf lists nothing: projected targets (align/projection.py) pad with
    such entries, repeating an id the teacher already listed. They are neither written to the
    table (they would overwrite that id's real value) nor counted among the listed tokens: the
    tail is spread over the V - n_j tokens teacher j really lists (n_j = its finite entries).
    """
    K, k = len(topk_logprobs), topk_logprobs[0].shape[-1]
    c, M = buckets.ids.shape
    dtype = tails[0].dtype
    values = torch.stack([v.to(dtype) for v in topk_logprobs])  # [K, c, k]
    tail = torch.stack(tails).unsqueeze(-1)  # [K, c, 1]
    norm = torch.logsumexp(torch.cat([values, tail], dim=-1), dim=-1, keepdim=True)
    values, tail = values - norm, tail - norm
    listed = torch.isfinite(values)  # [K, c, k]
    # Per unlisted token: tail / (V - n_j); where a teacher lists all V tokens there are none (no tail mass).
    unlisted = (vocab_size - listed.sum(-1, keepdim=True)).to(dtype)  # [K, c, 1]
    per_token = torch.where(unlisted > 0, tail - unlisted.clamp_min(1).log(), -math.inf)
    # One extra cell at the end takes the writes of the entries that list nothing.
    table = torch.empty(K * c * (M + 1) + 1, dtype=dtype, device=values.device)
    table[:-1].view(K, c, M + 1).copy_(per_token.expand(K, c, M + 1))
    # Each (teacher, token, bucket) is listed at most once by a finite entry: one scatter places every stored value.
    slot_values = values.permute(1, 0, 2).reshape(c, K * k)  # slot j * k + i: teacher j's i-th value
    rows = torch.arange(c, device=table.device).unsqueeze(-1)
    teacher_of_slot = torch.arange(K * k, device=table.device) // k
    flat = (teacher_of_slot * c + rows) * (M + 1) + buckets.bucket_of_slot
    flat = torch.where(listed.permute(1, 0, 2).reshape(c, K * k), flat, table.numel() - 1)
    table.scatter_(0, flat.reshape(-1), slot_values.reshape(-1))
    return table[:-1].view(K, c, M + 1)


def sparse_target(
    topk_ids: list[Tensor], topk_logprobs: list[Tensor], tails: list[Tensor], weights: Tensor,
    blend: str, vocab_size: int,
) -> tuple[Tensor, Buckets]:
    """The blended target on the buckets of c tokens.

    topk_ids / topk_logprobs: K tensors [c, k]; tails: K tensors [c] (the compute dtype);
    weights [c, K] -> (target [c, M + 1] log-probs with empty buckets at EMPTY_LOGPROB, buckets).
    Rows whose weights are all 0 come out all -inf apart from the empty slots (no loss there).
    """
    buckets = bucket_layout(topk_ids, vocab_size)
    table = teacher_table(buckets, topk_logprobs, tails, vocab_size)
    online = OnlineBlend(blend, weights)
    for j in range(len(topk_ids)):
        online.add(j, table[j])
    target = online.result()
    M = buckets.ids.shape[-1]
    target[:, M] += buckets.log_rest_count.to(target.dtype)  # the rest bucket holds V - |U| tokens
    target[:, :M].masked_fill_(buckets.empty, -math.inf)
    # Normalise over the buckets (geometric: the blend normalised per token, not per bucket;
    # mixture: a no-op up to rounding). A row with no weight keeps its -inf (norm set to 0).
    norm = torch.logsumexp(target, dim=-1, keepdim=True)
    target.sub_(torch.where(torch.isfinite(norm), norm, 0.0))
    target[:, :M].masked_fill_(buckets.empty, EMPTY_LOGPROB)
    target[:, M].masked_fill_(buckets.rest_empty, EMPTY_LOGPROB)
    return target, buckets


@dataclass
class StudentSide:
    """The student on the buckets of c tokens, and what `logits_grad` needs.

    logprobs [c, M + 1]: on U, then log s_rest (s_rest = its probability outside U); empty
    buckets at EMPTY_LOGPROB. probs [c, V]: its probabilities (their U entries get overwritten).
    on_buckets [c, M]: its probabilities on U. rest [c]: log s_rest. tiny [c] bool: rows whose
    s_rest is below e^TINY_REST, and tiny_shares [n_tiny, V]: p_v / s_rest outside U (0 on U)
    for those rows, from log-probs recomputed there (1 / s_rest would overflow float32 and the
    p_v underflow).
    """

    logprobs: Tensor
    probs: Tensor
    on_buckets: Tensor
    rest: Tensor
    tiny: Tensor
    tiny_shares: Tensor | None


TINY_REST = -60.0  # below this log s_rest, exp(-rest) nears float32's overflow (e^88.7)


def student_on_buckets(logprobs: Tensor, buckets: Buckets, rows_again: Callable[[Tensor], Tensor]) -> StudentSide:
    """The student's side, from its log-probs at T [c, V] (consumed: turned into probabilities).

    s_rest: where the mass on U is at most 1/2, 1 - (sum over U), via log1p: s_rest >= 1/2, so
    the subtraction cannot cancel (relative error a few float eps) and nothing of size V is
    summed. Elsewhere the sum over the tokens outside U themselves, which never cancels. Where
    that is below e^TINY_REST (or underflows to 0: a logit gap above ~100 in float32), a
    logsumexp over log-probs recomputed by rows_again(row mask) -> those rows' log-probs [n, V].
    """
    on_ids = logprobs.gather(-1, buckets.ids)
    on_buckets = on_ids.exp()
    probs = logprobs.exp_()
    mass_on_u = torch.where(buckets.empty, 0.0, on_buckets).sum(dim=-1)
    rest = torch.log1p(-mass_on_u.clamp(max=0.5))
    exact = (mass_on_u > 0.5) & ~buckets.rest_empty
    if bool(exact.any()):
        rest[exact] = torch.log(probs[exact].scatter_(-1, buckets.ids[exact], 0.0).sum(dim=-1))  # on a copy
    tiny = (rest < TINY_REST) & ~buckets.rest_empty
    shares = None
    if bool(tiny.any()):
        outside = rows_again(tiny).scatter_(-1, buckets.ids[tiny], -math.inf)
        rest[tiny] = torch.logsumexp(outside, dim=-1)
        shares = outside.sub_(rest[tiny].unsqueeze(-1)).exp_()
    rest = torch.where(buckets.rest_empty, EMPTY_LOGPROB, rest)
    student = torch.cat([on_ids.masked_fill_(buckets.empty, EMPTY_LOGPROB), rest.unsqueeze(-1)], dim=-1)
    return StudentSide(student, probs, on_buckets, rest, tiny, shares)


def logits_grad(grad_buckets: Tensor, side: StudentSide, buckets: Buckets) -> Tensor:
    """d loss / d (logits / T) [c, V] from d loss / d student buckets [c, M + 1], in place on
    side.probs (side.on_buckets is consumed too).

    With g_u the buckets' gradients (empty ones are constants: dropped), g_r the rest's and
    G = sum_u g_u + g_r: v outside U gets p_v (g_r / s_rest - G) (rest = log sum of those p_v,
    then log_softmax), u in U gets g_u - p_u G. In tiny rows the first is written as
    (p_v / s_rest) (g_r - s_rest G), from the recomputed shares.
    """
    M = buckets.ids.shape[-1]
    grad_slots = grad_buckets[:, :M].masked_fill(buckets.empty, 0.0)
    grad_rest = grad_buckets[:, M].masked_fill(buckets.rest_empty, 0.0)
    total = grad_slots.sum(dim=-1) + grad_rest
    # exp(-rest) = 1 / s_rest; 0 where the rest is empty (its gradient is 0 anyway) or tiny
    # (those rows are rewritten below).
    per_rest = torch.where(buckets.rest_empty | side.tiny, 0.0, grad_rest * torch.exp(-side.rest))
    grad = side.probs.mul_((per_rest - total).unsqueeze(-1))
    if side.tiny_shares is not None:
        tiny = side.tiny
        grad[tiny] = side.tiny_shares.mul_((grad_rest[tiny] - side.rest[tiny].exp() * total[tiny]).unsqueeze(-1))
    on_ids = side.on_buckets.mul_(-total.unsqueeze(-1)).add_(grad_slots)  # [c, M]: g_u - p_u G
    # Empty slots repeat the row's first id: give them the first slot's value, so that one
    # scatter writes a single value per id whichever duplicate lands last.
    return grad.scatter_(-1, buckets.ids, torch.where(buckets.empty, on_ids[:, :1], on_ids))


def sparse_chunk_grad(plan: "_SparsePlan", rows: slice | Tensor, weights: Tensor, logprobs: Tensor, sums: ChunkSums,
                      vocab_size: int, rows_again: Callable[[Tensor], Tensor]) -> Tensor | None:
    """One chunk of the sparse loss (this driver's and the fused one's): the teachers' buckets for
    `rows`, weights [c, K] (0 where a row has no target), the student's log-probs at T [c, V]
    (consumed) -> the divergence added to `sums`, and d loss / d (logits / T) [c, V] (None without
    needs_grad). rows_again(row mask) -> those rows' log-probs again (student_on_buckets)."""
    target, buckets = sparse_target(
        [ids[rows] for ids in plan.topk_ids], [values[rows] for values in plan.topk_logprobs],
        [tail[rows].to(sums.dtype) for tail in plan.tails], weights, plan.blend, vocab_size)
    side = student_on_buckets(logprobs, buckets, rows_again)
    grad_buckets = sums.divergence(side.logprobs, target, weights.sum(dim=-1) > 0)
    return None if grad_buckets is None else logits_grad(grad_buckets, side, buckets)


@dataclass(kw_only=True)
class _SparsePlan(LossPlan):
    """The sparse driver's plan: the teachers' top-k and tails (flattened over B*T) and the
    routing weights."""

    topk_ids: list[Tensor]  # K x [B*T, k] long
    topk_logprobs: list[Tensor]  # K x [B*T, k]
    tails: list[Tensor]  # K x [B*T]
    weights: Tensor  # [B*T, K]


class _SparseDistill(_ChunkedDistill):
    """Forward as in the dense driver with the target and the divergence on buckets; the
    backward pass (gradient buffer scaling + cross-entropy) is inherited unchanged."""

    @staticmethod
    def forward(ctx: Any, student_logits: Tensor, plan: _SparsePlan) -> tuple[Tensor, Tensor]:  # type: ignore[override]
        ctx.set_materialize_grads(False)
        has_teachers = bool(plan.topk_ids)
        run = ChunkRun(plan, student_logits, has_teachers)
        temperature, dtype = run.temperature, run.dtype
        V = student_logits.shape[-1]
        for rows, valid, logprobs in run.chunks():
            if not has_teachers:
                continue
            weights = plan.weights[rows].to(dtype) * valid.unsqueeze(-1)  # no target, no weight
            grad = sparse_chunk_grad(
                plan, rows, weights, logprobs, run, V,
                lambda bad: torch.log_softmax(run.flat_student[rows][bad].to(dtype) / temperature, dim=-1))  # noqa: B023
            if grad is not None:
                run.store_grad(rows, valid, grad)
            del grad, logprobs
        return run.finish(ctx)


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
    check_common_inputs(student_logits, len(topk_ids), weights, targets, config, blend, chunk_tokens)
    plan = _SparsePlan(
        **sparse_plan_fields(student_logits.shape, topk_ids, topk_logprobs, tail_logprobs, weights),
        **shared_plan_fields(student_logits, targets, divergence, config, blend, chunk_tokens, compute_ce),
    )
    div_sum, ce_sum = _SparseDistill.apply(student_logits, plan)
    return DistillOutput(div_sum, ce_sum, int(plan.valid_idx.numel()), plan.target_entropy_sum)


def sparse_plan_fields(shape: tuple[int, ...], topk_ids: list[Tensor], topk_logprobs: list[Tensor],
                       tail_logprobs: list[Tensor], weights: Tensor) -> dict[str, Any]:
    """Check the teachers' sparse inputs against the student's [B, T, V] `shape` and flatten them
    over B*T: the teachers' fields of a sparse plan (this driver's and the fused one's)."""
    B, T, V = shape
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
    return {"topk_ids": [ids.reshape(B * T, -1).long() for ids in topk_ids],
            "topk_logprobs": [values.detach().reshape(B * T, -1) for values in topk_logprobs],
            "tails": [tail.detach().reshape(B * T) for tail in tail_logprobs],
            "weights": weights.detach().reshape(B * T, K)}
