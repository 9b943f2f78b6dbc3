"""The loss driver: blended-teacher divergence and gold cross-entropy over valid tokens, in chunks.

`distill_loss` never holds more than one chunk of vocabulary-sized float32 tensors per teacher at
a time: positions without a target are dropped by index first, the flattened valid tokens are
processed chunk_tokens at a time, and the teachers of a chunk are folded into the blend one by
one (`OnlineBlend`), so peak extra memory is O(chunk_tokens x V) and does not grow with K.

Gradients: the forward pass computes, chunk by chunk, d(loss_chunk)/d(student logits of the
chunk) -- autograd through the divergence (any registered one) w.r.t. the chunk's student
log-probs, then the log_softmax Jacobian applied by hand, in place -- with a local graph that is
freed right away, and writes it into one gradient buffer shaped like the student logits (zero
rows at masked positions). Backward scales that buffer in place by the incoming gradient and
adds the cross-entropy gradient, recomputed per chunk as softmax - onehot; the buffer itself
becomes the logits' gradient, with no copy. Hence the outputs can be backpropagated once (no
retain_graph) and not twice-differentiated.

Forward KL at T = 1 (the default loss) skips the log-softmax chain: each chunk's softmax S is
written into the buffer, the gradient is S - P, and the value needs only the logsumexp
(`ChunkSums.forward_kl_from_logits`; the fused driver does the same per chunk of logits).

`distill_loss_dense` is the plain reference with the same signature and standard autograd.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

from merge_distill.losses.base import LossConfigBase
from merge_distill.losses.blend import OnlineBlend, blend_logprobs, check_blend_mode
from merge_distill.losses.forward_kl import forward_kl
from merge_distill.losses.registry import DivergenceFn
from merge_distill.signals import IGNORE_INDEX


@dataclass
class DistillOutput:
    """Sums over the valid tokens of one micro-batch (the engine normalises them).

    divergence_sum: scalar, sum of T^2 * divergence(student_T, target_T); differentiable.
    ce_sum: scalar, sum of next-token cross-entropy at temperature 1; differentiable (0 if skipped).
    n_tokens: number of positions with a target (targets != -100).
    target_entropy_sum: sum of the entropy of the blended target at temperature T (nats).
    teacher_entropy_filled: with fill_teacher_entropy, whether every row of teacher_entropy was
        written (every chunk's target was the only teacher's own log-probs).
    """

    divergence_sum: Tensor
    ce_sum: Tensor
    n_tokens: int
    target_entropy_sum: float
    teacher_entropy_filled: bool = False


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 inputs stay float64 (for reference tests); everything else runs in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def target_entropy(target_logprobs: Tensor) -> Tensor:
    """-sum_v P log P per row, [N, V] -> [N], with 0 * log 0 = 0 (no gradient)."""
    with torch.no_grad():
        terms = torch.where(torch.isneginf(target_logprobs), 0.0, target_logprobs)
        return -terms.mul_(torch.exp(target_logprobs)).sum(dim=-1)


def check_common_inputs(
    student_logits: Tensor, num_teachers: int, weights: Tensor, targets: Tensor,
    config: LossConfigBase, blend: str, chunk_tokens: int,
) -> None:
    """The checks both drivers share: student logits [B, T, V], weights [B, T, K], targets
    [B, T] holding -100 or ids in [0, V), a positive chunk size, a known blend, and teachers
    unless the loss is pure cross-entropy."""
    if student_logits.dim() != 3:
        raise ValueError(f"student_logits must be [B, T, V], got shape {tuple(student_logits.shape)}")
    B, T, V = student_logits.shape
    if weights.shape != (B, T, num_teachers):
        raise ValueError(
            f"weights have shape {tuple(weights.shape)}, expected [B, T, K] = [{B}, {T}, {num_teachers}]"
        )
    if targets.shape != (B, T):
        raise ValueError(f"targets have shape {tuple(targets.shape)}, expected [B, T] = [{B}, {T}]")
    if num_teachers == 0 and config.hard_label_weight < 1.0:
        raise ValueError(
            f"no teachers were given but hard_label_weight is {config.hard_label_weight}; "
            "only pure cross-entropy (hard_label_weight = 1.0) runs without teachers"
        )
    if chunk_tokens < 1:
        raise ValueError(f"chunk_tokens must be >= 1, got {chunk_tokens}")
    check_blend_mode(blend)
    valid_targets = targets[targets != IGNORE_INDEX]
    if valid_targets.numel() and (int(valid_targets.min()) < 0 or int(valid_targets.max()) >= V):
        raise ValueError(f"targets must be -100 or token ids in [0, {V}); got values outside that range")


def _check_inputs(
    student_logits: Tensor, teacher_logits: list[Tensor], weights: Tensor, targets: Tensor,
    config: LossConfigBase, blend: str, chunk_tokens: int,
) -> None:
    check_common_inputs(student_logits, len(teacher_logits), weights, targets, config, blend, chunk_tokens)
    for k, logits in enumerate(teacher_logits):
        if logits.shape != student_logits.shape:
            raise ValueError(
                f"teacher_logits[{k}] has shape {tuple(logits.shape)} but the student logits have "
                f"{tuple(student_logits.shape)}; cut both to the tokenizer's vocabulary first"
            )


@dataclass(kw_only=True)
class LossPlan:
    """What both drivers' autograd functions need besides the student logits (flattened over
    B*T), and how the rows are cut into chunks. The dense and the sparse plans add their
    teachers' side; `shared_plan_fields` fills these."""

    targets: Tensor  # [B*T]
    valid_idx: Tensor  # [N] flat indices of positions with a target
    divergence: DivergenceFn
    config: LossConfigBase
    blend: str
    chunk_tokens: int
    compute_ce: bool
    needs_grad: bool
    target_entropy_sum: float = 0.0  # filled in by the forward pass

    def chunks(self) -> list[Tensor]:
        """Chunks of the valid rows' indices (what the backward pass walks)."""
        return list(torch.split(self.valid_idx, self.chunk_tokens))

    def in_place(self, grad_buffer: Tensor | None, dtype: torch.dtype) -> bool:
        """Work inside the gradient buffer's own rows: there is one, it has the compute dtype,
        and at least half the rows have a target (the others ride along and are zeroed)."""
        return grad_buffer is not None and grad_buffer.dtype == dtype and 2 * self.valid_idx.numel() >= len(self.targets)

    def row_groups(self, in_place: bool) -> list[slice] | list[Tensor]:
        """Rows per forward chunk. With `in_place`, contiguous slices of all rows: each chunk is
        computed inside its own rows of the gradient buffer (no gather, no scatter back, no
        zeroing); rows without a target ride along with zero weight and are zeroed. Else
        chunks of the valid rows' indices."""
        if not in_place:
            return self.chunks()
        n = self.targets.numel()
        return [slice(start, min(n, start + self.chunk_tokens)) for start in range(0, n, self.chunk_tokens)]


def shared_plan_fields(student_logits: Tensor, targets: Tensor, divergence: DivergenceFn, config: LossConfigBase,
                       blend: str, chunk_tokens: int, compute_ce: bool) -> dict[str, Any]:
    """The LossPlan fields, from a driver's arguments (targets [B, T])."""
    flat_targets = targets.reshape(-1)
    return {"targets": flat_targets, "valid_idx": (flat_targets != IGNORE_INDEX).nonzero().squeeze(-1),
            "divergence": divergence, "config": config, "blend": blend, "chunk_tokens": chunk_tokens,
            "compute_ce": compute_ce, "needs_grad": torch.is_grad_enabled() and student_logits.requires_grad}


def chunk_logprobs(flat_student: Tensor, rows: slice | Tensor, grad_buffer: Tensor | None, in_place: bool,
                   dtype: torch.dtype, temperature: float, gold: Tensor, valid: Tensor,
                   compute_ce: bool) -> tuple[Tensor, Tensor]:
    """One chunk's student log-probs at temperature T, [c, V] in dtype, and the chunk's summed
    cross-entropy at temperature 1 (0-dim; 0 without compute_ce).

    flat_student [B*T, V]; rows a slice (in place) or indices [c]; gold [c, 1] target ids
    (clamped), valid [c] bool. In place, the log-probs are written into the chunk's own rows of
    grad_buffer (which end up holding the gradient); else into a fresh tensor. At T = 1 one
    fused log_softmax reads the logits and writes the log-probs (no copy first). The CE
    gradient is recomputed in backward, so nothing is kept for it.
    """
    if temperature == 1.0 and in_place:
        logprobs = torch.log_softmax(flat_student[rows], dim=-1, out=grad_buffer[rows])  # type: ignore[index]
    else:
        # Advanced indexing copies, so the in-place ops below touch no caller tensor.
        logprobs = grad_buffer[rows].copy_(flat_student[rows]) if in_place else flat_student[rows].to(dtype)  # type: ignore[index]
    ce_sum = torch.zeros((), dtype=dtype, device=flat_student.device)
    if temperature != 1.0:
        if compute_ce:  # CE = logsumexp(logits) - logit[gold], before the logits are scaled
            ce_sum += torch.where(valid, torch.logsumexp(logprobs, dim=-1) - logprobs.gather(-1, gold).squeeze(-1), 0.0).sum()
        logprobs.div_(temperature)
    if temperature != 1.0 or not in_place:
        torch.log_softmax(logprobs, dim=-1, out=logprobs)  # in place: one fused pass, no temporaries
    if compute_ce and temperature == 1.0:
        ce_sum -= torch.where(valid, logprobs.gather(-1, gold).squeeze(-1), 0.0).sum()
    return logprobs, ce_sum


class ChunkSums:
    """The running sums of one forward pass of a loss driver (divergence, CE, target entropy),
    and the chunk divergence every driver computes the same way (`divergence`)."""

    def __init__(self, plan: Any, dtype: torch.dtype, device: torch.device):
        self.plan = plan
        self.dtype = dtype
        self.temperature = plan.config.temperature
        self.div_sum = torch.zeros((), dtype=dtype, device=device)
        self.ce_sum = torch.zeros_like(self.div_sum)
        self.entropy_sum = torch.zeros_like(self.div_sum)

    def divergence(self, student: Tensor, target: Tensor, has_weight: Tensor) -> Tensor | None:
        """Add the chunk's T^2 * divergence and target entropy (rows with weight only) to the sums.

        student [c, W] log-probs at T (W = V, or the sparse driver's buckets), target [c, W]
        (consumed), has_weight [c] -> d(T^2 * summed divergence) / d student [c, W], or None
        without needs_grad. Forward KL in closed form; any other divergence through autograd on a
        local graph that lives for this chunk only.
        """
        plan, temperature = self.plan, self.temperature
        if plan.divergence is forward_kl:  # d/d log S = -T^2 P on rows with weight
            probs = self._forward_kl(student, target, has_weight, consume=True)
            return None if probs is None else zero_rows(probs.mul_(-temperature**2), ~has_weight)
        self.entropy_sum += torch.where(has_weight, target_entropy(target), 0.0).sum()
        with torch.enable_grad():
            student.requires_grad_(plan.needs_grad)
            per_token = plan.divergence(student, target, plan.config)
            if per_token.shape != student.shape[:1]:
                raise ValueError(f"divergence returned shape {tuple(per_token.shape)}, expected [N] = {tuple(student.shape[:1])}")
            # Rows with no teacher weight have no target distribution: no loss there.
            chunk_loss = torch.where(has_weight, per_token, 0.0).sum() * temperature**2
            grad = torch.autograd.grad(chunk_loss, student)[0] if plan.needs_grad else None
        self.div_sum += chunk_loss.detach()
        return grad

    def logits_grad(self, student: Tensor, target: Tensor, has_weight: Tensor) -> Tensor | None:
        """`divergence` chained through the student's log_softmax: d(T^2 * summed divergence) /
        d(logits / T) [c, V], written over `student` (log-probs at T [c, V], consumed), or None.
        `target` is only read (it may be a teacher's own log-probs).

        In general g - S sum_v g with g = d / d log S and S = exp(log S). Forward KL in closed
        form, T^2 (S - P) on rows with weight (sum_v P = 1): two passes instead of five.
        """
        if self.plan.divergence is forward_kl:
            probs = self._forward_kl(student, target, has_weight, consume=False)
            if probs is None:
                return None
            grad = student.exp_().sub_(probs)
            if self.temperature != 1.0:
                grad.mul_(self.temperature**2)
            return zero_rows(grad, ~has_weight)
        grad = self.divergence(student, target, has_weight)
        if grad is None:
            return None
        return student.detach().exp_().mul_(-grad.sum(dim=-1, keepdim=True)).add_(grad)

    def forward_kl_from_logits(self, logits: Tensor, target: Tensor, has_weight: Tensor, out: Tensor | None = None,
                               entropy: Tensor | None = None, fill: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """`logits_grad` for forward KL at T = 1 from the student's logits, through its softmax S
        instead of its log-probs: logits x [c, V] (read; overwritten when `out` is None), target log P
        [c, V] (read), its entropy [c] if known -> (S - P on rows with weight [c, V], written into
        `out` or over x; lse [c], the logsumexp of x, from which CE = lse - x_gold).

        The value needs no log S: sum P log P - sum P x + lse sum P, taken before S overwrites x,
        and lse = max x - log max S (max S >= 1/V, so its log is as exact as the softmax). S is
        not exponentiated again: two passes over V fewer than log_softmax, then `logits_grad`.
        fill: where the plan's teacher_entropy is to be written, these rows' target entropy goes
        to it (0 on rows without weight)."""
        top = logits.amax(dim=-1)
        probs = torch.exp(target)
        neg_entropy = -entropy if entropy is not None else _dot_clamped(probs, target)
        cross = torch.linalg.vecdot(probs, logits) - neg_entropy  # sum P x - sum P log P
        mass = probs.sum(dim=-1)
        student = torch.softmax(logits, dim=-1, out=logits if out is None else out)
        lse = top - student.amax(dim=-1).log()
        self._add_forward_kl(lse * mass - cross, -neg_entropy, has_weight, fill)
        return zero_rows(student.sub_(probs), ~has_weight), lse

    def _forward_kl(self, student: Tensor, target: Tensor, has_weight: Tensor, consume: bool) -> Tensor | None:
        """Forward KL's value and target entropy into the sums; -> the target's P [c, V] or None.
        student: log-probs (`_forward_kl_chunk`)."""
        per_token, entropy, probs = _forward_kl_chunk(student, target, self.plan.needs_grad, consume)
        self._add_forward_kl(per_token, entropy, has_weight)
        return probs

    def _add_forward_kl(self, per_token: Tensor, entropy: Tensor, has_weight: Tensor, fill: Tensor | None = None) -> None:
        """Add a chunk's forward KL [c] and target entropy [c] (rows with weight) to the sums; fill:
        a view to write the entropy rows into (0 where no weight)."""
        entropy = torch.where(has_weight, entropy, 0.0)
        if fill is not None:
            fill.copy_(entropy)
        self.entropy_sum += entropy.sum()
        self.div_sum += torch.where(has_weight, per_token, 0.0).sum() * self.temperature**2


class ChunkRun(ChunkSums):
    """One forward pass of a loss driver over its plan's row chunks (both drivers use it).

    Sets up the gradient buffer shaped like the flattened student logits [B*T, V] (None without
    `needs_grad` or teachers) and yields each chunk's rows, valid mask [c] and student log-probs
    at T [c, V] (adding its CE at T = 1 to ce_sum). Per chunk the driver builds its target and
    calls `divergence` (sums and gradient) and `store_grad`; `finish` hands the sums and the
    buffer to the autograd context.
    """

    def __init__(self, plan: Any, student_logits: Tensor, has_teachers: bool):
        super().__init__(plan, compute_dtype(student_logits.dtype), student_logits.device)
        V = student_logits.shape[-1]
        self.student_logits = student_logits
        self.flat_student = student_logits.reshape(-1, V)
        self.grad_buffer = torch.empty_like(self.flat_student) if plan.needs_grad and has_teachers else None
        self.in_place = plan.in_place(self.grad_buffer, self.dtype)
        if self.grad_buffer is not None and not self.in_place:  # rows with a target are all written later
            no_target = torch.ones(self.flat_student.shape[0], dtype=torch.bool, device=student_logits.device)
            no_target[plan.valid_idx] = False
            self.grad_buffer[no_target] = 0.0

    def chunks(self) -> Iterator[tuple[slice | Tensor, Tensor, Tensor]]:
        """-> (rows: a slice or indices [c], valid [c] bool, student log-probs at T [c, V])."""
        for rows in self.plan.row_groups(self.in_place):
            targets = self.plan.targets[rows]
            valid = targets != IGNORE_INDEX
            gold = targets.clamp(min=0).unsqueeze(-1)  # [c, 1]
            logprobs, chunk_ce = chunk_logprobs(self.flat_student, rows, self.grad_buffer, self.in_place, self.dtype,
                                                self.temperature, gold, valid, self.plan.compute_ce)
            self.ce_sum += chunk_ce
            yield rows, valid, logprobs

    def logit_chunks(self) -> Iterator[tuple[slice, Tensor, Tensor, Tensor]]:
        """For `in_place` runs: -> (rows, valid [c] bool, logits [c, V] (a view: read only), the
        chunk's rows of the gradient buffer [c, V]) (`forward_kl_from_logits`)."""
        for rows in self.plan.row_groups(True):
            yield rows, self.plan.targets[rows] != IGNORE_INDEX, self.flat_student[rows], self.grad_buffer[rows]  # type: ignore[index, misc]

    def add_ce(self, logits: Tensor, lse: Tensor, targets: Tensor) -> None:
        """The chunk's CE at temperature 1, lse - x_gold over rows with a target (targets [c])."""
        if self.plan.compute_ce:
            gold = logits.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
            self.ce_sum += torch.where(targets != IGNORE_INDEX, lse - gold, 0.0).sum()

    def store_grad(self, rows: slice | Tensor, valid: Tensor, grad: Tensor) -> None:
        """grad [c, V] = d loss / d (logits / T) of the chunk -> d loss / d logits in the buffer."""
        if self.temperature != 1.0:
            grad.div_(self.temperature)
        if self.in_place:  # already in its rows; rows without a target had no weight: zero them
            grad.index_fill_(0, (~valid).nonzero().squeeze(-1), 0.0)
        else:
            self.grad_buffer.index_copy_(0, rows, grad.to(self.grad_buffer.dtype))  # type: ignore[union-attr]

    def finish(self, ctx: Any) -> tuple[Tensor, Tensor]:
        """Hand the buffer to the autograd context; -> (divergence sum, CE sum)."""
        plan = self.plan
        plan.target_entropy_sum = float(self.entropy_sum)
        ctx.plan = plan
        ctx.grad_buffer = self.grad_buffer
        ctx.logits_shape = self.student_logits.shape
        ctx.backward_done = False
        if plan.compute_ce and plan.needs_grad:
            ctx.save_for_backward(self.student_logits)
        return self.div_sum, self.ce_sum


@dataclass(kw_only=True)
class _Plan(LossPlan):
    """The dense driver's plan: the teachers' logits (flattened views) and the routing weights."""

    teacher_logits: list[Tensor]  # K x [B*T, V], detached
    weights: Tensor  # [B*T, K], detached
    teachers_normalized: bool = False  # teacher_logits hold log-probs at temperature 1
    teacher_entropy: Tensor | None = None  # [B*T]: the only teacher's entropy at T = 1, if known
    fill_teacher_entropy: bool = False  # teacher_entropy is to be written, not read (own-target chunks)
    teacher_entropy_filled: bool = True  # cleared by a chunk that could not write it


def _blend_chunk(plan: _Plan, rows: slice | Tensor, dtype: torch.dtype, valid: Tensor) -> tuple[Tensor, Tensor, bool]:
    """Target log-probs [c, V] at temperature T for the rows (a slice, or indices [c]),
    has_weight [c] bool (rows without a target, valid False, get no weight), and whether the
    target is the only teacher's own log-probs (a view: read only)."""
    weights = plan.weights[rows] * valid.unsqueeze(-1)
    if _own_logprobs(plan, rows, dtype, weights, valid):
        # One teacher at full weight: the target is its own log-probs, read in place (no copy);
        # log 1 + log P = log P and log_softmax(1 * log P) = log P in either blend.
        return plan.teacher_logits[0][rows], valid, True
    online = OnlineBlend(plan.blend, weights)
    for k, logits in enumerate(plan.teacher_logits):
        if (plan.blend == "mixture" and plan.config.temperature == 1.0 and plan.teachers_normalized
                and isinstance(rows, slice) and isinstance(logits, Tensor)):
            # log w_k + log P_k read from the view into a fresh tensor: the copy and the weight in one pass
            online.add(k, torch.add(logits[rows], online.log_weight(k, dtype)).to(dtype), weighted=True)
            continue
        # A fresh copy, so the in-place ops below touch no caller tensor: advanced indexing
        # copies (and is far faster on CPU than index_select for rows this long); a slice is a
        # view and is copied explicitly.
        # (fused.HeadLogits rows are made fresh: no copy needed)
        x = logits[rows].to(dtype, copy=isinstance(rows, slice) and isinstance(logits, Tensor))
        if plan.config.temperature != 1.0:
            x.div_(plan.config.temperature)
        if plan.config.temperature != 1.0 or not plan.teachers_normalized:
            torch.log_softmax(x, dim=-1, out=x)  # in place: one fused pass, no temporaries
        online.add(k, x)
        del x
    return online.result(), weights.sum(dim=-1) > 0, False


def teacher_entropy_rows(plan: _Plan, rows: slice | Tensor, own: bool) -> tuple[Tensor | None, Tensor | None]:
    """The single teacher's entropy for a chunk whose target is its own log-probs: (known [c], to
    read, or None; fill [c], a view to write into, or None), as the plan says."""
    given = plan.teacher_entropy[rows] if own and plan.teacher_entropy is not None else None
    return (None, given) if plan.fill_teacher_entropy else (given, None)


def _own_logprobs(plan: _Plan, rows: slice | Tensor, dtype: torch.dtype, weights: Tensor, valid: Tensor) -> bool:
    """Whether a chunk's target is its only teacher's log-probs as they are: one normalized teacher
    in the compute dtype, T = 1, a contiguous chunk, and weight 1 on every row with a target."""
    if len(plan.teacher_logits) != 1 or not plan.teachers_normalized or plan.config.temperature != 1.0:
        return False
    logits = plan.teacher_logits[0]
    if not isinstance(rows, slice) or not isinstance(logits, Tensor) or logits.dtype != dtype:
        return False
    return bool(((weights[:, 0] == 1.0) | ~valid).all())


def _forward_kl_chunk(student: Tensor, target: Tensor, needs_grad: bool,
                      consume: bool) -> tuple[Tensor, Tensor, Tensor | None]:
    """Forward KL of a chunk in closed form: per token sum_v P (log P - log S) [c], the target's
    entropy -sum_v P log P [c], and the target's probabilities P [c, V] (None without
    `needs_grad`), from which both gradients are one or two passes. student: log S [c, V].

    A token with P = 0 (log P = -inf) would add 0 * -inf = NaN to the sums: log P is clamped to
    the lowest finite float there, so each product is 0 * finite = 0, as in `kl_target_student`.
    With `consume` the target is clamped and then overwritten in place (the sparse driver's
    buckets, where empty slots are -inf); else it is only read (it may be a teacher's own
    log-probs), and the rare rows that came out NaN are computed again, clamped."""
    probs = torch.exp(target)
    if consume:
        target.clamp_(min=torch.finfo(target.dtype).min)
        entropy = -torch.linalg.vecdot(probs, target)
        per_token = torch.linalg.vecdot(probs, target.sub_(student))
    else:
        entropy = -_dot_clamped(probs, target)
        per_token = torch.linalg.vecdot(probs, torch.sub(target, student))
        bad = torch.isnan(per_token).nonzero().squeeze(-1)
        if bad.numel():
            finite = target[bad].clamp(min=torch.finfo(target.dtype).min)
            per_token[bad] = torch.linalg.vecdot(probs[bad], finite.sub_(student[bad]))
    return per_token, entropy, probs if needs_grad else None


def _dot_clamped(probs: Tensor, logprobs: Tensor) -> Tensor:
    """sum_v P log P per row [c] (P = exp(log P), [c, V] each), with 0 * -inf = 0: rows that come
    out NaN are summed again with log P clamped to the lowest finite float."""
    out = torch.linalg.vecdot(probs, logprobs)
    bad = torch.isnan(out).nonzero().squeeze(-1)
    if bad.numel():
        out[bad] = torch.linalg.vecdot(probs[bad], logprobs[bad].clamp(min=torch.finfo(logprobs.dtype).min))
    return out


def zero_rows(grad: Tensor, rows: Tensor) -> Tensor:
    """grad [c, W] with the rows where `rows` [c] bool is True set to 0, in place (only those rows
    are written)."""
    return grad.index_fill_(0, rows.nonzero().squeeze(-1), 0.0)


class _ChunkedDistill(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, student_logits: Tensor, plan: _Plan) -> tuple[Tensor, Tensor]:  # type: ignore[override]
        ctx.set_materialize_grads(False)
        has_teachers = bool(plan.teacher_logits)
        run = ChunkRun(plan, student_logits, has_teachers)
        if run.in_place and plan.divergence is forward_kl and run.temperature == 1.0 and run.dtype == student_logits.dtype:
            # forward KL at T = 1 works from the student's softmax (forward_kl_from_logits)
            for rows, valid, logits, buffer in run.logit_chunks():
                target, has_weight, own = _blend_chunk(plan, rows, run.dtype, valid)
                known, fill = teacher_entropy_rows(plan, rows, own)
                grad, lse = run.forward_kl_from_logits(logits, target, has_weight, buffer, known, fill)
                run.add_ce(logits, lse, plan.targets[rows])
                run.store_grad(rows, valid, grad)
                plan.teacher_entropy_filled &= own
                del target, has_weight, grad
            return run.finish(ctx)
        plan.teacher_entropy_filled = False
        for rows, valid, logprobs in run.chunks():
            if not has_teachers:
                continue
            target, has_weight, _ = _blend_chunk(plan, rows, run.dtype, valid)
            # through log_softmax(logits / T) by hand, in place over the log-probs (the graph is gone)
            grad = run.logits_grad(logprobs, target, has_weight)
            del target, has_weight
            if grad is not None:
                run.store_grad(rows, valid, grad)
            del grad, logprobs
        return run.finish(ctx)

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_div: Tensor | None, grad_ce: Tensor | None) -> tuple[Tensor | None, None]:  # type: ignore[override]
        if ctx.backward_done:
            raise RuntimeError(
                "distill_loss outputs can be backpropagated only once: the gradient buffer is "
                "scaled in place (retain_graph is not supported)"
            )
        ctx.backward_done = True
        plan: _Plan = ctx.plan
        buffer: Tensor | None = ctx.grad_buffer
        ctx.grad_buffer = None  # drop our reference: autograd can then adopt the buffer as .grad
        want_ce = plan.compute_ce and grad_ce is not None
        if buffer is None and not want_ce:
            return None, None
        if buffer is not None:
            if grad_div is None:
                buffer.zero_()
            else:
                buffer.mul_(grad_div)
        if want_ce:
            (student_logits,) = ctx.saved_tensors
            V = student_logits.shape[-1]
            flat_student = student_logits.reshape(-1, V)
            if buffer is None:
                buffer = torch.zeros_like(flat_student)
            dtype = compute_dtype(student_logits.dtype)
            for idx in plan.chunks():
                # d CE / d logits = softmax(logits) - onehot(target), recomputed per chunk.
                probs = torch.softmax(flat_student[idx].to(dtype), dim=-1)
                rows = torch.arange(idx.numel(), device=idx.device)
                probs[rows, plan.targets.index_select(0, idx)] -= 1.0
                probs.mul_(grad_ce)
                buffer.index_add_(0, idx, probs.to(buffer.dtype))
                del probs
        return buffer.view(ctx.logits_shape), None  # type: ignore[union-attr]


def distill_loss(
    student_logits: Tensor,
    teacher_logits: list[Tensor],
    weights: Tensor,
    targets: Tensor,
    divergence: DivergenceFn,
    config: LossConfigBase,
    blend: str = "mixture",
    chunk_tokens: int = 1024,
    compute_ce: bool = True,
    teachers_normalized: bool = False,
    teacher_entropy: Tensor | None = None,
    fill_teacher_entropy: bool = False,
) -> DistillOutput:
    """Chunked blended-teacher distillation loss; memory nearly flat in K.

    student_logits [B, T, V] (any float dtype; the gradient flows to it);
    teacher_logits: K tensors [B, T, V] (any float dtype; treated as constants; K may be 0 only
    when config.hard_label_weight == 1.0, i.e. pure cross-entropy);
    weights [B, T, K] (treated as constants; rows summing to 0 carry no divergence);
    targets [B, T] long, -100 = no target. Logits and teachers are divided by
    config.temperature before the softmax, and the divergence is multiplied by T^2; the
    cross-entropy uses temperature 1. Computation is float32 (float64 for float64 logits).
    teachers_normalized: teacher_logits already hold log-probs at temperature 1 (as
    the online teacher source leaves float32 teachers): at T = 1 their log-softmax is skipped.
    teacher_entropy [B, T]: with one teacher, its entropy at temperature 1 as its signals have it;
    where the target is that teacher's own log-probs, the target entropy is read from it.
    fill_teacher_entropy: instead, write that entropy into teacher_entropy (a view of the caller's
    tensor; 0 where there is no target); the output's teacher_entropy_filled says whether every
    row was written (forward KL at T = 1 with the teacher at full weight everywhere).
    """
    _check_inputs(student_logits, teacher_logits, weights, targets, config, blend, chunk_tokens)
    V = student_logits.shape[-1]
    plan = _Plan(
        teacher_logits=[logits.detach().reshape(-1, V) for logits in teacher_logits],
        weights=weights.detach().reshape(targets.numel(), len(teacher_logits)),
        teachers_normalized=teachers_normalized,
        # written through when filling (a view of the caller's tensor), else only read
        teacher_entropy=None if teacher_entropy is None else (
            teacher_entropy.detach().view(-1) if fill_teacher_entropy else teacher_entropy.detach().reshape(-1)),
        fill_teacher_entropy=fill_teacher_entropy and teacher_entropy is not None and len(teacher_logits) == 1,
        **shared_plan_fields(student_logits, targets, divergence, config, blend, chunk_tokens, compute_ce),
    )
    div_sum, ce_sum = _ChunkedDistill.apply(student_logits, plan)
    return DistillOutput(div_sum, ce_sum, int(plan.valid_idx.numel()), plan.target_entropy_sum,
                         plan.fill_teacher_entropy and plan.teacher_entropy_filled)


def distill_loss_dense(
    student_logits: Tensor,
    teacher_logits: list[Tensor],
    weights: Tensor,
    targets: Tensor,
    divergence: DivergenceFn,
    config: LossConfigBase,
    blend: str = "mixture",
    chunk_tokens: int = 1024,
    compute_ce: bool = True,
    teachers_normalized: bool = False,
    teacher_entropy: Tensor | None = None,
    fill_teacher_entropy: bool = False,
) -> DistillOutput:
    """Plain reference for `distill_loss` (same signature; chunk_tokens, teachers_normalized,
    teacher_entropy and fill_teacher_entropy are ignored: log_softmax of log-probs is the
    identity, the entropy is computed here, and nothing is filled).

    Materialises every teacher's log-probs [K, N, V] at once, blends them with `blend_logprobs`
    and differentiates with ordinary autograd. Memory grows with K: use it for tests only.
    """
    _check_inputs(student_logits, teacher_logits, weights, targets, config, blend, chunk_tokens)
    V = student_logits.shape[-1]
    dtype = compute_dtype(student_logits.dtype)
    flat_targets = targets.reshape(-1)
    valid_idx = (flat_targets != IGNORE_INDEX).nonzero().squeeze(-1)
    student = student_logits.reshape(-1, V)[valid_idx].to(dtype)  # [N, V]
    temperature = config.temperature
    div_sum = torch.zeros((), dtype=dtype, device=student_logits.device)
    entropy_sum = 0.0
    if teacher_logits:
        teacher_logprobs = torch.stack([
            torch.log_softmax(logits.detach().reshape(-1, V)[valid_idx].to(dtype) / temperature, -1)
            for logits in teacher_logits
        ])  # [K, N, V]
        valid_weights = weights.detach().reshape(-1, len(teacher_logits)).index_select(0, valid_idx).to(dtype)
        target = blend_logprobs(teacher_logprobs, valid_weights, blend)
        has_weight = valid_weights.sum(dim=-1) > 0
        per_token = divergence(torch.log_softmax(student / temperature, dim=-1), target, config)
        div_sum = torch.where(has_weight, per_token, 0.0).sum() * temperature**2
        entropy_sum = float(torch.where(has_weight, target_entropy(target), 0.0).sum())
    ce_sum = torch.zeros((), dtype=dtype, device=student_logits.device)
    if compute_ce:
        ce_sum = F.cross_entropy(student, flat_targets.index_select(0, valid_idx), reduction="sum")
    return DistillOutput(div_sum, ce_sum, int(valid_idx.numel()), entropy_sum)
