"""The batch that flows from data to teachers, router and loss, and per-token teacher statistics.

What the teachers say about a batch (DenseSignals, SparseSignals) lives in sources/signals.py.

Conventions used everywhere:
- B batch, T sequence, V vocabulary (cut to the tokenizer's size), K teachers, H hidden size.
- `targets[b, t]` is the token that position t must predict (labels shifted left by one);
  -100 where there is no target (padding, prompt tokens, the last position). Logits are never
  shifted or copied: logits[:, t] predict targets[:, t].
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

IGNORE_INDEX = -100


def shift_targets(labels: Tensor) -> Tensor:
    """labels [B, T] (HF convention, unshifted) -> targets [B, T]; last position is ignored."""
    pad = torch.full_like(labels[:, :1], IGNORE_INDEX)
    return torch.cat([labels[:, 1:], pad], dim=1)


@dataclass
class TokenBatch:
    """One micro-batch.

    input_ids [B, T] long; attention_mask [B, T] long; labels [B, T] long (-100 = no loss);
    domains: the data domain tag of each row (len B); sources: the source name of each row;
    row_index: each row's index within its source (len B; what the teacher cache is keyed by),
    None for batches not drawn from sources. on_policy: the targets are tokens the student
    sampled (onpolicy.py), not the data's.
    """

    input_ids: Tensor
    attention_mask: Tensor
    labels: Tensor
    domains: list[str]
    sources: list[str]
    row_index: list[int] | None = None
    on_policy: bool = False

    @property
    def targets(self) -> Tensor:
        return shift_targets(self.labels)

    def to(self, device: torch.device | str) -> "TokenBatch":
        return TokenBatch(
            self.input_ids.to(device),
            self.attention_mask.to(device),
            self.labels.to(device),
            self.domains,
            self.sources,
            self.row_index,
            self.on_policy,
        )


@torch.no_grad()
def per_token_stats(logits: Tensor, targets: Tensor, chunk_tokens: int = 2048, in_place: bool = False,
                    with_top1: bool = True, with_entropy: bool = True) -> tuple[Tensor, Tensor, Tensor | None]:
    """Gold NLL, entropy and argmax of one model's next-token distribution, in chunks.

    logits [B, T, V] (any float dtype), targets [B, T] -> (gold_nll, entropy, top1), each [B, T];
    gold_nll and entropy are float32 and 0 where targets == -100; top1 is None without
    `with_top1` (an argmax pass saved when nobody reads it); without `with_entropy` the entropy is
    left 0 (its exp pass saved: a loss that computes it anyway fills it in). Log-softmax is computed in
    float32 on chunks of flattened tokens so peak extra memory is chunk_tokens x V.

    This runs for every teacher at every step, so it makes two passes that transcend (the
    log-softmax and one exp) and no temporaries beyond those two: the entropy is one fused dot
    product -sum_v p log p.

    in_place: where `normalizes_in_place(logits)`, the logits are turned into log-probs in place
    (the log-softmax the loss driver would otherwise repeat), so the loss can skip it.
    """
    B, T, V = logits.shape
    in_place = in_place and normalizes_in_place(logits)
    flat_logits = logits.view(B * T, V) if in_place else logits.reshape(B * T, V)
    flat_targets = targets.reshape(B * T)
    nll = torch.zeros(B * T, dtype=torch.float32, device=logits.device)
    ent = torch.zeros_like(nll)
    top1 = torch.zeros(B * T, dtype=torch.long, device=logits.device) if with_top1 else None
    for start in range(0, B * T, chunk_tokens):
        sl = slice(start, start + chunk_tokens)
        if in_place:
            logp = torch.log_softmax(flat_logits[sl], dim=-1, out=flat_logits[sl])  # one fused pass
        else:
            logp = torch.log_softmax(flat_logits[sl].float(), dim=-1)
        tgt = flat_targets[sl]
        valid = tgt != IGNORE_INDEX
        gold = logp.gather(-1, tgt.clamp(min=0).unsqueeze(-1)).squeeze(-1)
        nll[sl] = torch.where(valid, -gold, 0.0)
        if top1 is not None:
            top1[sl] = logp.argmax(-1)
        if not with_entropy:
            continue
        h = -torch.linalg.vecdot(logp.exp(), logp)
        bad = torch.isnan(h)
        if bad.any():  # p log p with p == 0 is 0, not 0 * -inf = NaN (a -inf logit); NaN logits stay NaN
            rows = logp[bad]
            h[bad] = -(rows.exp() * rows.masked_fill(torch.isneginf(rows), 0.0)).sum(-1)
        ent[sl] = torch.where(valid, h, 0.0)
    return nll.view(B, T), ent.view(B, T), top1.view(B, T) if top1 is not None else None


def normalizes_in_place(logits: Tensor) -> bool:
    """Whether per_token_stats(in_place=True) can turn these logits [B, T, V] into log-probs in
    place: float32/float64, and [B * T, V] is a view of them (a vocabulary cut's slice is)."""
    if logits.dtype not in (torch.float32, torch.float64):
        return False
    try:
        logits.view(-1, logits.shape[-1])
    except RuntimeError:
        return False
    return True


LOG_HALF = -0.6931471805599453  # log(1/2)


def tail_logmass(scores: Tensor, lse: Tensor, top_values: Tensor, top_ids: Tensor) -> Tensor:
    """log of the probability outside the top k: scores [c, V] (logits or log-probs, overwritten
    where needed), lse [c] their logsumexp (0 for log-probs), top_values / top_ids [c, k] -> [c].

    Where the top k hold at most half the mass, log1p(-m) is exact to a few float eps: 1 - m >= 1/2,
    so the subtraction cannot cancel, and it costs O(k). Elsewhere (a peaked teacher) the
    logsumexp over the other V - k scores, never 1 - m, which would cancel catastrophically."""
    listed = torch.logsumexp(top_values, dim=-1) - lse                   # log m
    tail = torch.log1p(-listed.clamp_max(LOG_HALF).exp())
    heavy = torch.nonzero(listed > LOG_HALF).squeeze(-1)
    if heavy.numel():
        rest = scores[heavy].scatter_(-1, top_ids[heavy], -float("inf"))  # a copy of those rows
        tail[heavy] = torch.logsumexp(rest, dim=-1) - lse[heavy]
    return tail
