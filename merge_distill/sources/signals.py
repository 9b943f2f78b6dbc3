"""What a teacher source says about one micro-batch: dense or sparse signals.

Both kinds carry the per-token statistics routers read (gold NLL and entropy at temperature 1,
[B, T, K] float32, 0 where the target is -100) and own the two calls that depend on how the
distributions are held, so the engine never asks which kind it has:

    signals.loss(student_logits, weights, targets, setup) -> DistillOutput
    signals.loss_from_hidden(hidden, head, weights, targets, setup) -> the same (train.fused_loss)
    signals.agreement(mask, vocab_size, max_tokens)       -> Agreement (pairwise, report only)

DenseSignals hold every teacher's full distribution [B, T, V] (online teachers); SparseSignals
hold each teacher's top-k log-probs at the loss temperature plus the log of the remaining mass
(the offline cache). A new kind (cross-tokenizer, served teachers) is one more class here with
the same two methods.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from itertools import combinations
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from merge_distill.errors import NonFiniteError
from merge_distill.losses.base import LossConfigBase
from merge_distill.losses.chunked import DistillOutput, distill_loss
from merge_distill.losses.fused import fused_distill_loss, fused_sparse_distill_loss, head_logits
from merge_distill.losses.registry import DivergenceFn
from merge_distill.losses.sparse import bucket_layout, sparse_distill_loss, teacher_table
from merge_distill.report.stats import agreement_positions, logit_agreement, pairwise_js
from merge_distill.signals import IGNORE_INDEX, per_token_stats


@dataclass(frozen=True)
class LossSetup:
    """The recipe's loss settings, resolved once per run: the divergence function, its config
    (temperature, hard-label weight, beta/alpha), the blend mode and the chunk size."""

    divergence: DivergenceFn
    config: LossConfigBase
    blend: str
    chunk_tokens: int


@dataclass
class Agreement:
    """Pairwise teacher agreement on `tokens` sampled positions: top-1 matches and summed JS
    divergence per teacher pair (pairs in `itertools.combinations(range(K), 2)` order), [P] float64."""

    top1: Tensor
    js: Tensor
    tokens: int


@dataclass
class DenseSignals:
    """Full distributions from teachers that ran on the batch.

    logits: K tensors [B, T, V] (one per teacher, not stacked, so no K-sized copy is made), cut
        to the tokenizer's vocabulary, in the teacher's compute dtype; when `normalized` they hold
        log-probs at temperature 1 (log_softmax applied in place).
    gold_nll, entropy [B, T, K] float32 at temperature 1 (0 where target is -100).
    entropy_pending: the entropy is not computed yet (0s; one teacher, a router that does not read
        it): `loss` fills it in, from the target's entropy where that is the teacher's own
        log-probs, else by the usual pass. Read it only after `loss`.
    """

    names: list[str]
    logits: list[Tensor]
    gold_nll: Tensor
    entropy: Tensor
    normalized: bool = False
    entropy_pending: bool = False
    covered: None = None      # every teacher covers every position
    next_bytes: None = None   # not measured on this path

    @property
    def top1(self) -> Tensor:
        """[B, T, K] long: each teacher's argmax token."""
        return torch.stack([logits.argmax(-1) for logits in self.logits], -1)

    def route(self, weights: Tensor) -> Tensor:
        """The router's weights [B, T, K] as the loss uses them: every teacher covers every position."""
        return weights

    def loss(self, student_logits: Tensor, weights: Tensor, targets: Tensor, setup: LossSetup) -> DistillOutput:
        """student_logits [B, T, V], weights [B, T, K] (detached), targets [B, T] -> summed loss parts."""
        out = distill_loss(student_logits, self.logits, weights, targets, setup.divergence, setup.config,
                           setup.blend, setup.chunk_tokens, compute_ce=True, teachers_normalized=self.normalized,
                           teacher_entropy=self.entropy[..., 0] if len(self.logits) == 1 else None,
                           fill_teacher_entropy=self.entropy_pending)
        self._settle_entropy(out.teacher_entropy_filled, targets)
        return out

    def _settle_entropy(self, filled: bool, targets: Tensor) -> None:
        """After the loss: a pending entropy that the loss did not fill is computed by the usual pass."""
        if self.entropy_pending and not filled:
            for k, logits in enumerate(self.logits):
                self.entropy[..., k] = per_token_stats(logits, targets, with_top1=False)[1]
        self.entropy_pending = False

    def loss_from_hidden(self, hidden: Tensor, head: StudentHead, weights: Tensor, targets: Tensor,
                         setup: LossSetup) -> DistillOutput:
        """`loss` from the student's final hidden states [B, T, H] and head (train.fused_loss): no
        [B, T, V] student logits (losses/fused.py)."""
        out = fused_distill_loss(hidden, head.weight, self.logits, weights, targets, setup.divergence, setup.config,
                                 setup.blend, setup.chunk_tokens, compute_ce=True,
                                 teachers_normalized=self.normalized, vocab_size=head.vocab_size,
                                 softcap=head.softcap)
        self._settle_entropy(False, targets)
        return out

    @torch.no_grad()
    def agreement(self, mask: Tensor, vocab_size: int, max_tokens: int) -> Agreement:
        """Exact top-1 agreement and JS over full distributions on up to max_tokens valid positions."""
        top1, js, tokens = logit_agreement(self.logits, mask, max_tokens)
        return Agreement(top1, js, tokens)


@dataclass
class SparseSignals:
    """Top-k targets read from the offline cache.

    topk_ids: K tensors [B, T, k] int64, ordered by log-prob (the first is the argmax);
    topk_logprobs: K tensors [B, T, k] float32 at the loss temperature; -inf past the entries an
        adaptive k kept (such an entry lists nothing);
    tail_logprobs: K tensors [B, T] float32, log of the mass outside the listed entries;
    gold_nll, entropy [B, T, K] float32 at temperature 1 (exact: stored from the full distribution).
    covered [B, T, K] bool or None: where each teacher has a target (teachers with another tokenizer
        cover only aligned positions; there gold_nll and entropy are per byte). None: everywhere.
    next_bytes [B, T, K] float or None: the byte length of each teacher's next token (report only).
    """

    names: list[str]
    topk_ids: list[Tensor]
    topk_logprobs: list[Tensor]
    tail_logprobs: list[Tensor]
    gold_nll: Tensor
    entropy: Tensor
    covered: Tensor | None = None
    next_bytes: Tensor | None = None  # [B, T, K]: bytes of each teacher's next token where it covers the position

    @property
    def top1(self) -> Tensor:
        return torch.stack([ids[..., 0].long() for ids in self.topk_ids], -1)

    def route(self, weights: Tensor) -> Tensor:
        """A teacher that does not cover a position gets weight 0 there; the others are renormalised.
        A position no teacher covers has all-zero weights (the loss then takes the gold token)."""
        if self.covered is None:
            return weights
        kept = torch.where(self.covered, weights, torch.zeros_like(weights))
        total = kept.sum(-1, keepdim=True)
        return torch.where(total > 0, kept / total.clamp_min(torch.finfo(kept.dtype).tiny), kept)

    def loss(self, student_logits: Tensor, weights: Tensor, targets: Tensor, setup: LossSetup) -> DistillOutput:
        """The same sums as DenseSignals.loss, on buckets (top-k union + rest), losses/sparse.py.

        Where no teacher covers a position (all weights 0 after `route`) the target is the gold token:
        its term is the cross-entropy at temperature 1 (the forward KL to a one-hot target), added to
        the divergence sum, so such a position trains on the hard label only."""
        uncovered = (weights.sum(-1) == 0) & (targets != IGNORE_INDEX)
        out = sparse_distill_loss(student_logits, self.topk_ids, self.topk_logprobs, self.tail_logprobs, weights,
                                  targets.masked_fill(uncovered, IGNORE_INDEX), setup.divergence, setup.config,
                                  setup.blend, setup.chunk_tokens, compute_ce=True)
        return with_gold_only(out, lambda: student_logits[uncovered], targets, uncovered)

    def loss_from_hidden(self, hidden: Tensor, head: StudentHead, weights: Tensor, targets: Tensor,
                         setup: LossSetup) -> DistillOutput:
        """`loss` from the student's final hidden states [B, T, H] and head (train.fused_loss):
        the sparse loss made one chunk of logits at a time, and the uncovered positions' logits alone."""
        uncovered = (weights.sum(-1) == 0) & (targets != IGNORE_INDEX)
        out = fused_sparse_distill_loss(
            hidden, head.weight, self.topk_ids, self.topk_logprobs, self.tail_logprobs, weights,
            targets.masked_fill(uncovered, IGNORE_INDEX), setup.divergence, setup.config, setup.blend,
            setup.chunk_tokens, compute_ce=True, vocab_size=head.vocab_size, softcap=head.softcap)
        return with_gold_only(out, lambda: head_logits(hidden[uncovered], head.weight, head.vocab_size, head.softcap),
                              targets, uncovered)

    @torch.no_grad()
    def agreement(self, mask: Tensor, vocab_size: int, max_tokens: int) -> Agreement:
        """Pairwise agreement from the cache on up to max_tokens evenly spaced valid tokens.

        top-1 agreement is exact. JS is an approximation: it is taken on the buckets of the pair's
        top-k union + one bucket for all other tokens, each teacher's unlisted tokens at its even
        tail share (losses/sparse.py); exact when k = V.
        """
        K = len(self.names)
        pairs = list(combinations(range(K), 2))
        top1 = torch.zeros(len(pairs), dtype=torch.float64)
        js = torch.zeros_like(top1)
        positions = agreement_positions(mask, max_tokens)
        if not pairs or positions.numel() == 0:
            return Agreement(top1, js, 0)
        k = self.topk_ids[0].shape[-1]
        ids = [t.reshape(-1, k)[positions].long() for t in self.topk_ids]
        values = [t.reshape(-1, k)[positions].float() for t in self.topk_logprobs]
        tails = [t.reshape(-1)[positions].float() for t in self.tail_logprobs]
        # All pairs at once: pair p's tokens are rows p * n ... (p + 1) * n - 1 of one layout.
        first, second = zip(*pairs)
        buckets = bucket_layout([torch.cat([ids[a] for a in first]), torch.cat([ids[b] for b in second])], vocab_size)
        table = teacher_table(buckets, [torch.cat([values[a] for a in first]), torch.cat([values[b] for b in second])],
                              [torch.cat([tails[a] for a in first]), torch.cat([tails[b] for b in second])], vocab_size)
        table[:, :, -1] += buckets.log_rest_count.float()  # rest holds V - |U| tokens
        table[:, :, :-1].masked_fill_(buckets.empty, -math.inf)  # [2, P * n, M + 1]
        top1 = (torch.cat([ids[a][:, 0] for a in first]) == torch.cat([ids[b][:, 0] for b in second])
                ).view(len(pairs), -1).sum(dim=-1).double().cpu()
        js = pairwise_js(table[0], table[1]).view(len(pairs), -1).double().sum(dim=-1).cpu()
        return Agreement(top1, js, int(positions.numel()))


TeacherSignals = DenseSignals | SparseSignals


@dataclass
class StudentHead:
    """The student's output head as the fused loss takes it (train.fused_loss): weight [V_rows, H]
    (tied or not), vocab_size V <= V_rows (the rows that are tokens), Gemma's soft-cap or None."""

    weight: Tensor
    vocab_size: int
    softcap: float | None


def with_gold_only(out: DistillOutput, uncovered_logits: Callable[[], Tensor], targets: Tensor,
                   uncovered: Tensor) -> DistillOutput:
    """Positions no teacher covers (uncovered [B, T] bool, no weight after `route`) train on the
    gold token: their cross-entropy at temperature 1 (the forward KL to a one-hot target) joins
    the divergence sum and the CE sum. uncovered_logits() -> their logits [n, V]."""
    if not bool(uncovered.any()):
        return out
    gold = F.cross_entropy(uncovered_logits().float(), targets[uncovered], reduction="sum")
    return DistillOutput(out.divergence_sum + gold, out.ce_sum + gold,  # (1 - w) gold + w gold = gold
                         out.n_tokens + int(uncovered.sum()), out.target_entropy_sum)


def check_finite(names: list[str], nll: list[Tensor], entropy: list[Tensor], where: str = "log-probabilities") -> None:
    """Raise NonFiniteError naming every teacher whose NLL or entropy [B, T] holds NaN/inf. Called
    after all teachers ran: under ZeRO-3 each forward is a collective every process must join."""
    bad = [name for name, n, e in zip(names, nll, entropy) if not (torch.isfinite(n).all() and torch.isfinite(e).all())]
    if bad:
        raise NonFiniteError(f"teacher {', '.join(repr(n) for n in bad)} produced NaN/inf {where}")
