"""Online teachers: the models run on every batch, whole or ZeRO-3 sharded.

Placement follows the recipe's `distributed:` section through the run's Accelerator: under
DeepSpeed with teacher_zero_stage 3 every teacher is partitioned as it loads (no process ever
holds a whole teacher) and becomes an inference-only engine; elsewhere it sits whole on the
device. The same source serves training, `merge-distill cache` and evaluation, so all three
phases place teachers alike.

Every process must call `signals` the same number of times: under ZeRO-3 a forward is a
collective (each layer's parameters are all-gathered from every rank).
"""

from __future__ import annotations

import torch
from accelerate import Accelerator
from torch import Tensor, nn

from merge_distill import distributed as dist_mod
from merge_distill.losses.fused import HeadLogits
from merge_distill.models import cut_vocab, load_teachers
from merge_distill.schema import SELF_TEACHER, Recipe
from merge_distill.signals import TokenBatch, normalizes_in_place, per_token_stats
from merge_distill.models import aligned_teachers
from merge_distill.routing.registry import ROUTERS
from merge_distill.sources.base import SourceContext, register_source
from merge_distill.sources.heads import head_forward
from merge_distill.sources.signals import DenseSignals, check_finite


def _uses_models(recipe: Recipe) -> bool:
    return (recipe.cache is None or not recipe.cache.use) and not aligned_teachers(recipe)


@register_source("online", {"gold_nll", "entropy", "top1", "logits", "hidden"}, _uses_models,
                 "the teacher models run on every batch (whole, or ZeRO-3 sharded under DeepSpeed)")
class OnlineTeachers:
    """K frozen teachers that share the student's tokenizer."""

    def __init__(self, names: list[str], models: list[nn.Module], vocab_size: int, chunk_tokens: int = 1024,
                 fused_heads: bool = False):
        self.names = names
        self.models = models
        self.vocab_size = vocab_size
        self.chunk_tokens = chunk_tokens
        self.fused_heads = fused_heads  # train.fused_loss: teachers hand over hidden states + head (HeadLogits)
        # One teacher and a router that does not read entropy: the loss fills the entropy in
        # (DenseSignals.entropy_pending), which saves a pass over V that it would repeat.
        self.entropy_from_loss = False
        self.head_verified: dict[int, bool] = {}  # per teacher: its head gives its own logits (sources/heads.py)

    @classmethod
    def open(cls, recipe: Recipe, accelerator: Accelerator, vocab_size: int, student: nn.Module | None = None,
             names: list[str] | None = None) -> "OnlineTeachers":
        """Load and place the recipe's teachers (those in `names`, default all). A `self` teacher is a
        frozen copy of `student`, which must then be given (its initial weights, before training)."""
        wanted = [t for t in recipe.teachers if names is None or t.name in names]
        if any(t.model == SELF_TEACHER for t in wanted) and student is None:
            raise ValueError("a `self` teacher needs the student's initial weights")
        dist = recipe.distributed
        models = load_teachers(recipe, wanted, student,
                               lambda dtype: dist_mod.teacher_init_context(accelerator, dist, dtype))
        placed = [dist_mod.prepare_teacher(accelerator, dist, m) for m in models]
        return cls([t.name for t in wanted], placed, vocab_size, recipe.train.chunk_tokens)

    @classmethod
    def for_training(cls, recipe: Recipe, context: SourceContext) -> "OnlineTeachers":
        source = cls.open(recipe, context.accelerator, len(context.tokenizer), context.student)
        # A ZeRO-3 teacher's head is partitioned outside its forward: such teachers give logits.
        source.fused_heads = recipe.train.fused_loss and not (
            dist_mod.uses_deepspeed(context.accelerator) and recipe.distributed.teacher_zero_stage == 3)
        source.entropy_from_loss = len(source.models) == 1 and "entropy" not in ROUTERS.get(recipe.routing.kind).impl.needs
        return source

    def held_bytes(self) -> list[tuple[int, int]]:
        return [dist_mod.held_parameter_bytes(m) for m in self.models]

    @torch.inference_mode()
    def signals(self, batch: TokenBatch) -> DenseSignals:
        """batch [B, T] -> per-teacher log-probs (or logits) [B, T, V] plus gold NLL / entropy [B, T, K].

        Raises NonFiniteError naming every teacher whose log-probabilities hold NaN/inf at a
        target position, after all teachers ran (under ZeRO-3 each forward is a collective that
        every process must join, so no process may leave the loop early)."""
        targets = batch.targets
        logits, nll, ent = [], [], []
        normalized = True
        inputs = {"input_ids": batch.input_ids, "attention_mask": batch.attention_mask, "use_cache": False}
        for i, model in enumerate(self.models):
            head_logits = head_forward(model, inputs, self.vocab_size, self.chunk_tokens, self.head_verified,
                                       i) if self.fused_heads else None
            if head_logits is not None:  # the fused teacher side: no [B, T, V] logits
                n, e = head_token_stats(head_logits, targets, self.chunk_tokens)
                normalized = False
                logits.append(head_logits)
                nll.append(n)
                ent.append(e)
                continue
            out = model(**inputs)
            teacher_logits = cut_vocab(out.logits, self.vocab_size)
            # float32 logits become log-probs in place: the loss then skips that log-softmax.
            normalized = normalized and normalizes_in_place(teacher_logits)
            pending = self.entropy_from_loss and normalized
            n, e, _ = per_token_stats(teacher_logits, targets, self.chunk_tokens, in_place=True, with_top1=False,
                                      with_entropy=not pending)
            logits.append(teacher_logits)
            nll.append(n)
            ent.append(e)
        check_finite(self.names, nll, ent)
        pending = self.entropy_from_loss and normalized
        with torch.inference_mode(not pending):  # a pending entropy is written later, outside inference mode
            entropy = torch.stack(ent, -1)
        return DenseSignals(self.names, logits, torch.stack(nll, -1), entropy, normalized=normalized,
                            entropy_pending=pending)


def head_token_stats(teacher: HeadLogits, targets: Tensor, chunk_tokens: int) -> tuple[Tensor, Tensor]:
    """Gold NLL and entropy [B, T] of a teacher given as hidden states + head, one chunk of
    logits at a time (per_token_stats on each chunk)."""
    flat_targets = targets.reshape(-1)
    nll, ent = [], []
    for start in range(0, flat_targets.numel(), chunk_tokens):
        rows = slice(start, start + chunk_tokens)
        n, e, _ = per_token_stats(teacher[rows][None], flat_targets[rows][None], chunk_tokens, in_place=True,
                                  with_top1=False)
        nll.append(n[0])
        ent.append(e[0])
    return torch.cat(nll).view(targets.shape), torch.cat(ent).view(targets.shape)
