"""The tensors that flow between data, teachers, router, blend and loss.

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
    domains: the data domain tag of each row (len B); sources: the source name of each row.
    """

    input_ids: Tensor
    attention_mask: Tensor
    labels: Tensor
    domains: list[str]
    sources: list[str]

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
        )


@dataclass
class TeacherSignals:
    """What the teachers said about one micro-batch.

    logits: K tensors [B, T, V] (one per teacher, not stacked, so no K-sized copy is made),
        already cut to the tokenizer's vocabulary, in the teacher's compute dtype.
    gold_nll [B, T, K] float32: -log p_k(target) at temperature 1 (0 where target is -100).
    entropy [B, T, K] float32: entropy of p_k at temperature 1 (0 where target is -100).
    top1 [B, T, K] long: each teacher's argmax token.
    """

    names: list[str]
    logits: list[Tensor]
    gold_nll: Tensor
    entropy: Tensor
    top1: Tensor


@torch.no_grad()
def per_token_stats(logits: Tensor, targets: Tensor, chunk_tokens: int = 2048) -> tuple[Tensor, Tensor, Tensor]:
    """Gold NLL, entropy and argmax of one model's next-token distribution, in chunks.

    logits [B, T, V] (any float dtype), targets [B, T] -> (gold_nll, entropy, top1), each [B, T];
    gold_nll and entropy are float32 and 0 where targets == -100. Log-softmax is computed in
    float32 on chunks of flattened tokens so peak extra memory is chunk_tokens x V.
    """
    B, T, V = logits.shape
    flat_logits = logits.reshape(B * T, V)
    flat_targets = targets.reshape(B * T)
    nll = torch.zeros(B * T, dtype=torch.float32, device=logits.device)
    ent = torch.zeros_like(nll)
    top1 = torch.zeros(B * T, dtype=torch.long, device=logits.device)
    for start in range(0, B * T, chunk_tokens):
        sl = slice(start, start + chunk_tokens)
        logp = torch.log_softmax(flat_logits[sl].float(), dim=-1)
        tgt = flat_targets[sl]
        valid = tgt != IGNORE_INDEX
        gold = logp.gather(-1, tgt.clamp(min=0).unsqueeze(-1)).squeeze(-1)
        nll[sl] = torch.where(valid, -gold, torch.zeros_like(gold))
        # xlogy-style: p * logp with p == 0 contributes 0, never 0 * -inf = NaN.
        p = logp.exp()
        h = -(p * torch.where(p > 0, logp, torch.zeros_like(logp))).sum(-1)
        ent[sl] = torch.where(valid, h, torch.zeros_like(h))
        top1[sl] = logp.argmax(-1)
    return nll.view(B, T), ent.view(B, T), top1.view(B, T)
