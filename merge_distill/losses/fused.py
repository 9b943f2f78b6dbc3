"""The logit-free loss driver: the student's final hidden states and its lm_head weight in, and no
[B, T, V] tensor anywhere. Teachers may come the same way (`HeadLogits`: hidden states and head,
rows of logits made per chunk), so K teachers never hold [B, T, V] either.

    per chunk of c valid tokens:  logits = h_c W[:V]^T  [c, V]  (soft-capped: cap * tanh(logits / cap))
                                  -> log-probs at T -> blend of the K teachers' rows -> divergence
                                  -> g = d loss / d logits [c, V]
                                  -> d h_c = g W[:V]   [c, H],   d W[:V] += g^T h_c   [V, H]

It is the dense driver's chunk (`losses/chunked.py`: the same blend, `ChunkSums.divergence`, the
same log_softmax chain by hand) with the matmul before it and its chain after it. Live memory is
one chunk's [c, V] plus gradients the sizes of the inputs ([N, H] and [V_rows, H]), where the
dense path holds the student's [B, T, V] logits and a gradient buffer as large.

Rows of W past `vocab_size` (padded embedding rows, e.g. Qwen's 151,936 rows for 151,665 tokens)
are never read; their gradient is 0. A tied lm_head is the embedding matrix: autograd adds this
gradient to the embedding's own.

The cross-entropy gradient (softmax - onehot, through the same matmul) is recomputed in backward,
one matmul per chunk, as the dense driver recomputes its softmax, so nothing [c, V] is kept.
Numerics: the matmul and everything after it run in float32 (float64 for float64 inputs), whatever
the dtype of h and W (bf16 on GPU: fp32 accumulation).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from merge_distill.losses.base import LossConfigBase
from merge_distill.losses.chunked import (
    ChunkSums,
    DistillOutput,
    _blend_chunk,
    _Plan,
    check_common_inputs,
    compute_dtype,
    shared_plan_fields,
)
from merge_distill.losses.forward_kl import forward_kl
from merge_distill.losses.registry import DivergenceFn
from merge_distill.losses.sparse import _SparsePlan, sparse_chunk_grad, sparse_plan_fields


class HeadLogits:
    """A teacher's logits [B, T, V] that are never built (the fused teacher side): its final
    hidden states [B, T, H] and head weight [V_rows, H]. It answers what the loss driver, the
    agreement statistics and the routers ask of a logits tensor: `shape`, `dtype`, `device`, `reshape(-1, V)`,
    rows by slice or index (`flat[rows]`, `index_select`) computed on demand in float32, and
    `argmax(-1)` in chunks. Rows past the tokenizer (padding) are never computed."""

    def __init__(self, hidden: Tensor, weight: Tensor, vocab_size: int, softcap: float | None = None,
                 chunk_tokens: int = 1024):
        self.hidden = hidden.reshape(-1, hidden.shape[-1])
        self.weight = weight[:vocab_size]
        self.softcap = softcap
        self.chunk_tokens = chunk_tokens
        self.shape = torch.Size((*hidden.shape[:-1], vocab_size))
        self.dtype = compute_dtype(hidden.dtype)
        self.device = hidden.device

    def reshape(self, *shape: int) -> "HeadLogits":
        return self  # rows are always addressed over the flattened B * T positions

    def detach(self) -> "HeadLogits":
        return self

    def __getitem__(self, rows: slice | Tensor) -> Tensor:
        """Logits of flattened positions `rows` -> [c, V] float32 (a fresh tensor)."""
        h = self.hidden[rows].to(self.dtype)
        return _chunk_logits(h, self.weight.to(self.dtype), self.softcap)[0]

    def index_select(self, dim: int, rows: Tensor) -> Tensor:
        return self[rows]

    def argmax(self, dim: int = -1) -> Tensor:
        n = self.hidden.shape[0]
        top = torch.cat([self[slice(s, s + self.chunk_tokens)].argmax(-1) for s in range(0, n, self.chunk_tokens)])
        return top.view(self.shape[:-1])


@dataclass(kw_only=True)
class _Head:
    """What a fused plan adds to its driver's plan: the tokenizer's vocabulary size (rows of the
    head that are tokens) and the soft-cap."""

    vocab_size: int
    softcap: float | None = None


@dataclass(kw_only=True)
class _FusedPlan(_Plan, _Head):
    """The dense plan (teachers' logits or HeadLogits) plus the head."""


@dataclass(kw_only=True)
class _FusedSparsePlan(_SparsePlan, _Head):
    """The sparse plan (teachers' top-k + tails: the cache, other tokenizers) plus the head."""


def _dense_logit_grad(plan: _FusedPlan, idx: Tensor, logprobs: Tensor, sums: ChunkSums, h: Tensor, W: Tensor) -> Tensor | None:
    """The dense chunk: blend the teachers' rows idx [c], add the divergence to `sums` ->
    d loss / d (logits / T) [c, V] (None without needs_grad). logprobs [c, V] at T is consumed."""
    valid = torch.ones(idx.numel(), dtype=torch.bool, device=idx.device)
    target, has_weight, _ = _blend_chunk(plan, idx, sums.dtype, valid)
    return sums.logits_grad(logprobs, target, has_weight)


def _sparse_logit_grad(plan: _FusedSparsePlan, idx: Tensor, logprobs: Tensor, sums: ChunkSums, h: Tensor,
                       W: Tensor) -> Tensor | None:
    """The sparse chunk (losses/sparse.py: buckets of the teachers' top-k union + rest) -> the same
    as _dense_logit_grad. Rows whose rest is tiny get their log-probs again from h [c, H] and W."""
    return sparse_chunk_grad(
        plan, idx, plan.weights[idx].to(sums.dtype), logprobs, sums, plan.vocab_size,
        lambda bad: torch.log_softmax(_chunk_logits(h[bad], W, plan.softcap)[0] / sums.temperature, dim=-1))


def _chunk_logits(h: Tensor, W: Tensor, softcap: float | None) -> tuple[Tensor, Tensor | None]:
    """h [c, H], W [V, H] in the compute dtype -> logits [c, V] and, when soft-capped, the tanh
    [c, V] (its derivative 1 - tanh^2 is the cap's chain)."""
    logits = h @ W.T
    if softcap is None:
        return logits, None
    squashed = torch.tanh(logits.div_(softcap))
    return squashed * softcap, squashed


class _FusedDistill(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, hidden: Tensor, weight: Tensor, plan: _FusedPlan | _FusedSparsePlan) -> tuple[Tensor, Tensor]:  # type: ignore[override]
        ctx.set_materialize_grads(False)
        dtype = compute_dtype(hidden.dtype)
        H = hidden.shape[-1]
        flat_h = hidden.reshape(-1, H)
        W = weight[: plan.vocab_size].to(dtype)
        sums = ChunkSums(plan, dtype, hidden.device)
        sparse = isinstance(plan, _FusedSparsePlan)
        has_teachers = bool(plan.topk_ids if sparse else plan.teacher_logits)
        logit_grad = _sparse_logit_grad if sparse else _dense_logit_grad
        want_grad = plan.needs_grad and has_teachers
        grad_h = torch.zeros(flat_h.shape, dtype=dtype, device=hidden.device) if want_grad else None
        grad_W = torch.zeros(weight.shape, dtype=dtype, device=hidden.device) if want_grad else None
        T = sums.temperature
        # forward KL at T = 1 from the chunk's softmax, as the dense driver (ChunkSums.forward_kl_from_logits)
        from_softmax = want_grad and not sparse and plan.divergence is forward_kl and T == 1.0
        for idx in plan.chunks():
            h = flat_h[idx].to(dtype)
            logprobs, squashed = _chunk_logits(h, W, plan.softcap)
            gold = logprobs.gather(-1, plan.targets[idx].unsqueeze(-1)).squeeze(-1)  # the gold token's logit
            if from_softmax:
                valid = torch.ones(idx.numel(), dtype=torch.bool, device=idx.device)
                target, has_weight, _ = _blend_chunk(plan, idx, dtype, valid)  # type: ignore[arg-type]
                g, lse = sums.forward_kl_from_logits(logprobs, target, has_weight)  # over the logits, in place
                if plan.compute_ce:
                    sums.ce_sum += (lse - gold).sum()
                del target, has_weight
            else:
                if plan.compute_ce:  # CE = logsumexp(logits) - logit[gold], at temperature 1
                    sums.ce_sum += (torch.logsumexp(logprobs, dim=-1) - gold).sum()
                if not has_teachers:
                    continue
                if T != 1.0:
                    logprobs.div_(T)
                torch.log_softmax(logprobs, dim=-1, out=logprobs)
                g = logit_grad(plan, idx, logprobs, sums, h, W)  # type: ignore[arg-type]
            del logprobs
            if g is None:
                continue
            # d/d(logits / T), then / T, then the cap's chain
            if T != 1.0:
                g.div_(T)
            if squashed is not None:
                g.mul_(1.0 - squashed.square_())
            grad_h.index_copy_(0, idx, g @ W)  # type: ignore[union-attr]
            grad_W[: plan.vocab_size].addmm_(g.T, h)  # type: ignore[index]
            del g
        plan.target_entropy_sum = float(sums.entropy_sum)
        ctx.plan, ctx.grads, ctx.shapes = plan, (grad_h, grad_W), (hidden.shape, hidden.dtype, weight.dtype)
        if plan.compute_ce and plan.needs_grad:
            ctx.save_for_backward(hidden, weight)
        return sums.div_sum, sums.ce_sum

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_div: Tensor | None, grad_ce: Tensor | None) -> tuple[Tensor | None, Tensor | None, None]:  # type: ignore[override]
        plan: _FusedPlan | _FusedSparsePlan = ctx.plan
        grad_h, grad_W = ctx.grads
        ctx.grads = (None, None)
        hidden_shape, hidden_dtype, weight_dtype = ctx.shapes
        if grad_h is not None:
            if grad_div is None:
                grad_h.zero_(), grad_W.zero_()
            else:
                grad_h.mul_(grad_div), grad_W.mul_(grad_div)
        if plan.compute_ce and grad_ce is not None and ctx.saved_tensors:
            hidden, weight = ctx.saved_tensors
            dtype = compute_dtype(hidden.dtype)
            flat_h = hidden.reshape(-1, hidden.shape[-1])
            W = weight[: plan.vocab_size].to(dtype)
            if grad_h is None:
                grad_h = torch.zeros(flat_h.shape, dtype=dtype, device=hidden.device)
                grad_W = torch.zeros(weight.shape, dtype=dtype, device=hidden.device)
            for idx in plan.chunks():
                # d CE / d logits = softmax(logits) - onehot(target), through the cap and the matmul
                h = flat_h[idx].to(dtype)
                logits, squashed = _chunk_logits(h, W, plan.softcap)
                probs = torch.softmax(logits, dim=-1)
                probs[torch.arange(idx.numel(), device=idx.device), plan.targets[idx]] -= 1.0
                probs.mul_(grad_ce)
                if squashed is not None:
                    probs.mul_(1.0 - squashed.square_())
                grad_h.index_add_(0, idx, probs @ W)
                grad_W[: plan.vocab_size].addmm_(probs.T, h)
                del probs, logits, squashed
        if grad_h is None:
            return None, None, None
        return grad_h.view(hidden_shape).to(hidden_dtype), grad_W.to(weight_dtype), None


def fused_distill_loss(
    hidden: Tensor,
    lm_head_weight: Tensor,
    teacher_logits: list[Tensor],
    weights: Tensor,
    targets: Tensor,
    divergence: DivergenceFn,
    config: LossConfigBase,
    blend: str = "mixture",
    chunk_tokens: int = 1024,
    compute_ce: bool = True,
    teachers_normalized: bool = False,
    vocab_size: int | None = None,
    softcap: float | None = None,
) -> DistillOutput:
    """`distill_loss` from the student's final hidden states instead of its logits.

    hidden [B, T, H] (the gradient flows to it); lm_head_weight [V_rows, H] (tied or not; the
    gradient flows to it); vocab_size V <= V_rows, the rows that are tokens (default V_rows);
    softcap: Gemma's final logit soft-capping (logits = cap * tanh(logits / cap)), or None.
    teacher_logits K x [B, T, V], weights [B, T, K], targets [B, T] and the rest as `distill_loss`.
    Equal to distill_loss(head(hidden)[..., :V], ...) in loss and gradients (tests/losses/test_fused.py).
    """
    V = _check_head(hidden, lm_head_weight, vocab_size)
    B, T, _ = hidden.shape
    shape_only = torch.empty(B, T, V, device="meta")
    check_common_inputs(shape_only, len(teacher_logits), weights, targets, config, blend, chunk_tokens)
    for k, logits in enumerate(teacher_logits):
        if logits.shape != (B, T, V):
            raise ValueError(f"teacher_logits[{k}] has shape {tuple(logits.shape)}, expected [B, T, V] = [{B}, {T}, {V}]")
    plan = _FusedPlan(
        teacher_logits=[logits.detach().reshape(-1, V) for logits in teacher_logits],
        weights=weights.detach().reshape(targets.numel(), len(teacher_logits)),
        teachers_normalized=teachers_normalized, vocab_size=V, softcap=softcap,
        **_shared_fields(hidden, lm_head_weight, targets, divergence, config, blend, chunk_tokens, compute_ce),
    )
    div_sum, ce_sum = _FusedDistill.apply(hidden, lm_head_weight, plan)
    return DistillOutput(div_sum, ce_sum, int(plan.valid_idx.numel()), plan.target_entropy_sum)


def fused_sparse_distill_loss(
    hidden: Tensor,
    lm_head_weight: Tensor,
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
    vocab_size: int | None = None,
    softcap: float | None = None,
) -> DistillOutput:
    """`sparse_distill_loss` (top-k + tail teachers: the cache, other tokenizers) from the
    student's final hidden states [B, T, H] and lm_head_weight [V_rows, H], as
    `fused_distill_loss`. Equal to sparse_distill_loss(head(hidden)[..., :V], ...) in loss and
    gradients (tests/losses/test_fused.py)."""
    V = _check_head(hidden, lm_head_weight, vocab_size)
    B, T, _ = hidden.shape
    shape_only = torch.empty(B, T, V, device="meta")
    check_common_inputs(shape_only, len(topk_ids), weights, targets, config, blend, chunk_tokens)
    plan = _FusedSparsePlan(
        **sparse_plan_fields(shape_only.shape, topk_ids, topk_logprobs, tail_logprobs, weights),
        vocab_size=V, softcap=softcap,
        **_shared_fields(hidden, lm_head_weight, targets, divergence, config, blend, chunk_tokens, compute_ce),
    )
    div_sum, ce_sum = _FusedDistill.apply(hidden, lm_head_weight, plan)
    return DistillOutput(div_sum, ce_sum, int(plan.valid_idx.numel()), plan.target_entropy_sum)


def head_logits(hidden: Tensor, lm_head_weight: Tensor, vocab_size: int, softcap: float | None) -> Tensor:
    """Differentiable logits [n, V] float32 of a few positions' hidden states [n, H] (the
    positions a fused loss sends elsewhere, e.g. to the hard label)."""
    dtype = compute_dtype(hidden.dtype)
    return _chunk_logits(hidden.to(dtype), lm_head_weight[:vocab_size].to(dtype), softcap)[0]


def _check_head(hidden: Tensor, lm_head_weight: Tensor, vocab_size: int | None) -> int:
    """hidden [B, T, H] and lm_head_weight [V_rows, H] -> V, the rows that are tokens."""
    if hidden.dim() != 3 or lm_head_weight.dim() != 2 or lm_head_weight.shape[1] != hidden.shape[-1]:
        raise ValueError(f"hidden must be [B, T, H] and lm_head_weight [V, H]; got {tuple(hidden.shape)} and "
                         f"{tuple(lm_head_weight.shape)}")
    V = vocab_size or lm_head_weight.shape[0]
    if V > lm_head_weight.shape[0]:
        raise ValueError(f"vocab_size {V} is beyond the lm_head's {lm_head_weight.shape[0]} rows")
    return V


def _shared_fields(hidden: Tensor, lm_head_weight: Tensor, targets: Tensor, divergence: DivergenceFn,
                   config: LossConfigBase, blend: str, chunk_tokens: int, compute_ce: bool) -> dict[str, Any]:
    fields = shared_plan_fields(hidden, targets, divergence, config, blend, chunk_tokens, compute_ce)
    fields["needs_grad"] = torch.is_grad_enabled() and (hidden.requires_grad or lm_head_weight.requires_grad)
    return fields
