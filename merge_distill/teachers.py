"""TeacherEnsemble: frozen teacher forwards -> TeacherSignals."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from merge_distill.models import cut_vocab
from merge_distill.signals import TeacherSignals, TokenBatch, normalizes_in_place, per_token_stats


class NonFiniteError(RuntimeError):
    """NaN or inf in a tensor of the training step; the message names the step, tensor and source."""


class TeacherEnsemble:
    """K frozen teachers that share the student's tokenizer.

    Every process calls every teacher's forward (required when teachers are ZeRO-3 partitioned:
    each forward gathers the parameters it needs from all ranks).
    """

    def __init__(self, names: list[str], models: list[nn.Module], vocab_size: int, chunk_tokens: int = 1024):
        self.names = names
        self.models = models
        self.vocab_size = vocab_size
        self.chunk_tokens = chunk_tokens

    @torch.inference_mode()
    def signals(self, batch: TokenBatch, targets: Tensor) -> TeacherSignals:
        """batch [B, T] -> per-teacher log-probs (or logits) [B, T, V] plus gold NLL / entropy [B, T, K].

        Raises NonFiniteError naming every teacher whose log-probabilities hold NaN/inf at a
        target position, after all teachers ran (under ZeRO-3 each forward is a collective that
        every process must join, so no process may leave the loop early)."""
        logits, nll, ent, bad = [], [], [], []
        normalized = True
        for name, model in zip(self.names, self.models):
            out = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False)
            teacher_logits = cut_vocab(out.logits, self.vocab_size)
            # float32 logits become log-probs in place: the loss then skips that log-softmax.
            normalized = normalized and normalizes_in_place(teacher_logits)
            n, e, _ = per_token_stats(teacher_logits, targets, self.chunk_tokens, in_place=True, with_top1=False)
            if not (torch.isfinite(n).all() and torch.isfinite(e).all()):
                bad.append(name)
            logits.append(teacher_logits)
            nll.append(n)
            ent.append(e)
        if bad:
            raise NonFiniteError(f"teacher {', '.join(repr(n) for n in bad)} produced NaN/inf log-probabilities")
        return TeacherSignals(self.names, logits, torch.stack(nll, -1), torch.stack(ent, -1), normalized=normalized)
