"""Teachers with other tokenizers: aligned through byte offsets, projected into the student's vocabulary.

Per batch and teacher (docs/CROSS_TOKENIZER.md):
1. each row's text (the bytes of the student's tokens) is tokenized by the teacher, and student
   positions are matched with teacher positions whose next tokens start at the same byte
   (align/alignment.py: one pass per row);
2. the teacher runs on its own ids, whole or ZeRO-3 sharded as in training; its logits are cut to
   its own tokenizer's size (padded embedding rows never reach a softmax). A whole teacher with a
   plain linear head hands over its final hidden states instead (sources/heads.py, which checks
   that the head gives the model's own logits), and its head runs in step 3, on the aligned
   positions only (no [B, T_j, V_j] logits);
3. at the aligned positions only, one chunk at a time: log-softmax, top-k + tail at the loss
   temperature, the NLL of the teacher's own next token and its entropy, both per byte of that
   token (so a coarser tokenizer does not look worse to a router);
4. top-k + tail are projected into the student's vocabulary (align/projection.py).

The result is SparseSignals with `covered`: a teacher weighs 0 where it is not aligned. A
teacher that shares the student's tokenizer skips steps 1 and 4 (identity), unless
`align.force`: then it takes the whole path, which at align.k = V gives the same loss as the
same-tokenizer path.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from accelerate import Accelerator
from torch import Tensor, nn
from transformers import PreTrainedTokenizerBase

from merge_distill import distributed as dist_mod
from merge_distill.align import TokenBytes, align_row, special_counterparts
from merge_distill.align.projection import project_topk, token_map
from merge_distill.losses.fused import HeadLogits
from merge_distill.models import aligned_teachers, cross_tokenizer_teachers, cut_vocab, load_teachers, load_tokenizer
from merge_distill.schema import Recipe, TeacherSpec
from merge_distill.signals import IGNORE_INDEX, TokenBatch, normalizes_in_place, per_token_stats, tail_logmass
from merge_distill.sources.base import SourceContext, register_source
from merge_distill.sources.heads import head_forward
from merge_distill.sources.signals import SparseSignals, check_finite


def _selects(recipe: Recipe) -> bool:
    return (recipe.cache is None or not recipe.cache.use) and bool(aligned_teachers(recipe))


def teacher_tokenizers(recipe: Recipe, teachers: list[TeacherSpec],
                       student_tokenizer: PreTrainedTokenizerBase) -> list[PreTrainedTokenizerBase]:
    """Each teacher's tokenizer: its own when it differs from the student's, else the student's."""
    cross = set(cross_tokenizer_teachers(recipe))
    return [load_tokenizer(t.model, t.revision, t.trust_remote_code) if t.name in cross else student_tokenizer
            for t in teachers]


@register_source("aligned", {"gold_nll", "entropy", "top1", "hidden"}, _selects,
                 "teachers with other tokenizers run on their own tokens of the same text, aligned through byte "
                 "offsets, top-k projected into the student's vocabulary")
class AlignedTeachers:
    def __init__(self, names: list[str], models: list[nn.Module], tokenizers: list[PreTrainedTokenizerBase],
                 student_tokenizer: PreTrainedTokenizerBase, k: int, temperature: float, chunk_tokens: int,
                 aligned: list[bool], sharded: bool = False):
        self.names = names
        self.models = models
        self.student_bytes = TokenBytes(student_tokenizer)
        self.teacher_bytes = [TokenBytes(t) for t in tokenizers]
        self.maps = [token_map(tb, self.student_bytes) for tb in self.teacher_bytes]
        self.counterparts = [special_counterparts(self.student_bytes, tb) for tb in self.teacher_bytes]
        self.vocab_sizes = [len(t) for t in tokenizers]
        self.student_vocab = len(student_tokenizer)
        self.k, self.temperature, self.chunk_tokens = k, temperature, chunk_tokens
        self.aligned = aligned  # per teacher: through the alignment (else: the student's own ids)
        self.sharded = sharded  # ZeRO-3 teachers: one forward per batch on every process (collectives)
        self.head_verified: dict[int, bool] = {}  # per teacher: its head gives its own logits (sources/heads.py)

    @classmethod
    def open(cls, recipe: Recipe, accelerator: Accelerator, student_tokenizer: PreTrainedTokenizerBase,
             student: nn.Module | None = None, names: list[str] | None = None) -> "AlignedTeachers":
        """Load and place the recipe's teachers (those in `names`, default all), each with its tokenizer."""
        wanted = [t for t in recipe.teachers if names is None or t.name in names]
        dist = recipe.distributed
        models = load_teachers(recipe, wanted, student,
                               lambda dtype: dist_mod.teacher_init_context(accelerator, dist, dtype))
        placed = [dist_mod.prepare_teacher(accelerator, dist, m) for m in models]
        tokenizers = teacher_tokenizers(recipe, wanted, student_tokenizer)
        aligned = [t.name in aligned_teachers(recipe) for t in wanted]
        sharded = dist_mod.uses_deepspeed(accelerator) and dist.teacher_zero_stage == 3
        return cls([t.name for t in wanted], placed, tokenizers, student_tokenizer, recipe.align.k,
                   recipe.loss.temperature, recipe.train.chunk_tokens, aligned, sharded)

    @classmethod
    def for_training(cls, recipe: Recipe, context: SourceContext) -> "AlignedTeachers":
        return cls.open(recipe, context.accelerator, context.tokenizer, context.student)

    def held_bytes(self) -> list[tuple[int, int]]:
        return [dist_mod.held_parameter_bytes(m) for m in self.models]

    def _teacher_batch(self, batch: TokenBatch, j: int) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        """(teacher ids [B, T_j], attention [B, T_j], teacher position per student position [B, T]
        (-1: none), byte length of each teacher position's next token [B, T_j], its next token [B, T_j])."""
        device = batch.input_ids.device
        B, T = batch.input_ids.shape
        if not self.aligned[j]:
            position = torch.arange(T, device=device).expand(B, T).clone()
            position[:, -1] = -1
            lengths = self.student_bytes.lengths.to(device)
            ids = batch.input_ids[:, 1:]
            inside = (ids >= 0) & (ids < lengths.numel())  # an id outside the table spells nothing
            nbytes = torch.where(inside, lengths[ids.clamp(0, lengths.numel() - 1)], 0).float()
            nbytes = torch.nn.functional.pad(nbytes, (0, 1))  # the last position has no next token
            return batch.input_ids, batch.attention_mask, position, nbytes, batch.targets
        rows = []
        for b in range(B):
            ids = batch.input_ids[b][batch.attention_mask[b].bool()].tolist()
            rows.append(align_row(ids, self.student_bytes, self.teacher_bytes[j], self.counterparts[j]))
        width = max(len(r.teacher_ids) for r in rows)
        pad = self.teacher_bytes[j].pad_id
        ids = torch.full((B, width), pad, dtype=torch.long)
        attention = torch.zeros((B, width), dtype=torch.long)
        position = torch.full((B, T), -1, dtype=torch.long)
        nbytes = torch.zeros((B, width), dtype=torch.float32)
        next_ids = torch.full((B, width), IGNORE_INDEX, dtype=torch.long)
        for b, row in enumerate(rows):
            n = len(row.teacher_ids)
            ids[b, :n] = torch.tensor(row.teacher_ids)
            attention[b, :n] = 1
            start = int((batch.attention_mask[b] == 0).long().argmin()) if batch.attention_mask[b, 0] == 0 else 0
            position[b, start: start + len(row.to_teacher)] = torch.tensor(row.to_teacher)
            nbytes[b, :n] = torch.tensor(row.teacher_next_bytes, dtype=torch.float32)
            next_ids[b, : n - 1] = ids[b, 1:n]
        return ids.to(device), attention.to(device), position.to(device), nbytes.to(device), next_ids.to(device)

    @torch.inference_mode()
    def text_nll(self, batch: TokenBatch) -> Tensor:
        """[K, 3] float64 per teacher: NLL (nats) summed over its own tokens of the batch's text, how
        many tokens, and their bytes (for bits per byte; special tokens and padding excluded)."""
        out = []
        for j in range(len(self.models)):
            sums = torch.zeros(3, dtype=torch.float64)
            for _, logits, _, nbytes, next_ids in self._teacher_logits(batch, j):
                scored = (nbytes > 0) & (next_ids != IGNORE_INDEX)
                nll, _, _ = per_token_stats(logits, next_ids.masked_fill(~scored, IGNORE_INDEX), self.chunk_tokens,
                                            with_top1=False)
                sums += torch.stack([nll.double().sum(), scored.double().sum(), nbytes.double()[scored].sum()]).cpu()
            out.append(sums)
        return torch.stack(out)

    def _teacher_logits(self, batch: TokenBatch, j: int) -> Iterator[tuple[Tensor, Tensor | HeadLogits, Tensor, Tensor,
                                                                             Tensor]]:
        """Teacher j's forwards over the batch, in groups of rows of similar length (`length_groups`:
        a teacher with a finer tokenizer has rows of very different lengths, and padding costs as
        much as text). Yields (the group's batch rows [G], logits [G, W, V_j] cut to the teacher's
        vocabulary (HeadLogits: its hidden states and head, for a whole teacher with a plain linear
        head), teacher position per student position [G, T], next-token bytes [G, W], next tokens
        [G, W]). ZeRO-3 teachers and the student's own ids: one group (one forward per
        batch on every process, as the collectives need)."""
        ids, attention, position, nbytes, next_ids = self._teacher_batch(batch, j)
        lengths = attention.sum(-1).tolist()
        rows = list(range(len(lengths)))
        model = self.models[j]
        for group in ([rows] if self.sharded or not self.aligned[j] else length_groups(lengths, FORWARD_TOKENS)):
            g = torch.tensor(group, device=ids.device)
            width = ids.shape[1] if len(group) == len(rows) else max(lengths[i] for i in group)  # right-padded
            inputs = {"input_ids": ids[g, :width], "attention_mask": attention[g, :width], "use_cache": False}
            # A whole teacher's head runs later, on the aligned positions only, one chunk at a time:
            # no [G, W, V_j] logits, and no head where no student position matches (a ZeRO-3 head
            # is partitioned: those give logits).
            logits = None if self.sharded else head_forward(model, inputs, self.vocab_sizes[j], self.chunk_tokens,
                                                            self.head_verified, j)
            if logits is None:
                logits = cut_vocab(model(**inputs).logits, self.vocab_sizes[j])
            yield g, logits, position[g], nbytes[g, :width], next_ids[g, :width]

    @torch.inference_mode()
    def teacher_targets(self, batch: TokenBatch, k: int) -> list[AlignedTargets]:
        """Per teacher, at the student's positions and in the teacher's own vocabulary: its top-k
        (k at most its vocabulary) + tail at the loss temperature, gold NLL and entropy per byte."""
        targets = batch.targets
        B, T = targets.shape
        device = targets.device
        valid = targets != IGNORE_INDEX
        out = []
        for j in range(len(self.models)):
            kj = min(k, self.vocab_sizes[j])
            result = AlignedTargets(
                ids=torch.zeros(B, T, kj, dtype=torch.long, device=device),
                logprobs=torch.full((B, T, kj), -math.inf, device=device),
                tail=torch.zeros(B, T, device=device),  # log 1: where a teacher has no target, all its mass is tail
                gold_nll=torch.zeros(B, T, device=device), entropy=torch.zeros(B, T, device=device),
                span=torch.full((B, T), -1, dtype=torch.int32, device=device))
            for group, logits, position, nbytes, next_ids in self._teacher_logits(batch, j):
                where = (position >= 0) & valid[group]                                # [G, T]
                rows = torch.nonzero(where, as_tuple=True)
                picked = position[rows]                                               # teacher positions
                for s in range(0, picked.numel(), self.chunk_tokens):
                    sl = slice(s, s + self.chunk_tokens)
                    chunk_rows = (group[rows[0][sl]], rows[1][sl])                    # in the batch
                    # one chunk of aligned rows [chunk, V_j], gathered: our own copy, free to overwrite
                    x = aligned_rows(logits, rows[0][sl], picked[sl])
                    gold = next_ids[rows[0][sl], picked[sl]]
                    # float32: x becomes log-probs at temperature 1 in place (one log-softmax pass serves both)
                    n, e, _ = per_token_stats(x.unsqueeze(0), gold.unsqueeze(0), self.chunk_tokens, in_place=True,
                                              with_top1=False)
                    width = nbytes[rows[0][sl], picked[sl]]
                    span = width.clamp_min(1.0)  # a special next token (EOS) spells no byte: per token there
                    result.span[chunk_rows] = width.to(torch.int32)
                    result.gold_nll[chunk_rows] = n[0] / span  # per byte of the teacher's token
                    result.entropy[chunk_rows] = e[0] / span
                    if self.temperature == 1.0 and normalizes_in_place(x):
                        logp = x
                    else:
                        logp = torch.log_softmax(x / self.temperature, -1)
                    values, teacher_ids = logp.topk(kj, -1)
                    result.tail[chunk_rows] = tail_logmass(logp, torch.zeros_like(span), values, teacher_ids)
                    result.ids[chunk_rows], result.logprobs[chunk_rows] = teacher_ids, values
                del logits
            out.append(result)
        check_finite(self.names, [r.gold_nll for r in out], [r.entropy for r in out])
        return out

    def signals(self, batch: TokenBatch) -> SparseSignals:
        """batch [B, T] -> per teacher: top-k ids / log-probs [B, T, k] and tail [B, T] in the student's
        vocabulary, gold NLL and entropy per byte [B, T, K], coverage [B, T, K]."""
        k = min(self.k, self.student_vocab)
        targets = self.teacher_targets(batch, k)
        return projected_signals(self.names, targets, [m if a else None for m, a in zip(self.maps, self.aligned)], k)


def aligned_rows(logits: Tensor | HeadLogits, rows: Tensor, positions: Tensor) -> Tensor:
    """Logits [G, W, V] (or the teacher's hidden states + head) at (rows [c], positions [c]) -> [c, V]
    float32, a fresh tensor."""
    if isinstance(logits, HeadLogits):
        return logits[rows * logits.shape[1] + positions]  # the head on these positions only
    return logits[rows, positions].float()


@dataclass
class AlignedTargets:
    """One teacher at the student's positions [B, T], in the teacher's own vocabulary (what the cache
    stores): ids [B, T, k] long and log-probs [B, T, k] float32 at the loss temperature (ids 0 and
    -inf where not aligned), tail [B, T] (log of the mass outside the top k), gold NLL and entropy
    per byte of the teacher's next token [B, T], and span [B, T] int32: that token's byte length,
    -1 where the teacher has no aligned position (or no target)."""

    ids: Tensor
    logprobs: Tensor
    tail: Tensor
    gold_nll: Tensor
    entropy: Tensor
    span: Tensor


def projected_signals(names: list[str], targets: list[AlignedTargets], maps: list[Tensor | None], k: int) -> SparseSignals:
    """Teachers' targets in their own vocabularies -> SparseSignals in the student's: top-k projected
    through each teacher's token map (None: the student's own tokenizer, kept as is), padded to a
    common width k with entries that list nothing (log-prob -inf)."""
    ids, logprobs, tails = [], [], []
    for target, mapping in zip(targets, maps):
        if mapping is None:
            i, lp, tail = target.ids, target.logprobs.float(), target.tail
        else:
            i, lp, tail = project_topk(target.ids, target.logprobs.float(), target.tail, mapping.to(target.ids.device))
        pad = k - i.shape[-1]
        ids.append(torch.nn.functional.pad(i.long(), (0, pad), value=0) if pad > 0 else i.long())
        logprobs.append(torch.nn.functional.pad(lp, (0, pad), value=-math.inf) if pad > 0 else lp)
        tails.append(tail.float())
    covered = torch.stack([t.span >= 0 for t in targets], -1)
    return SparseSignals(names, ids, logprobs, tails, torch.stack([t.gold_nll for t in targets], -1),
                         torch.stack([t.entropy for t in targets], -1), covered,
                         torch.stack([t.span.float().clamp_min(0) for t in targets], -1))


FORWARD_TOKENS = 64  # what one more teacher forward costs, in padded tokens (for length_groups)


def length_groups(lengths: list[int], overhead: int = FORWARD_TOKENS) -> list[list[int]]:
    """Rows split into groups of similar length for separate forwards: sorted by length, cut into
    runs that minimise the padded tokens computed (rows x longest row, per group) plus `overhead`
    per forward. Exact, by dynamic programming over the sorted rows (O(B^2))."""
    order = sorted(range(len(lengths)), key=lengths.__getitem__)
    best = [0.0] + [math.inf] * len(order)
    cut = [0] * (len(order) + 1)
    for end in range(1, len(order) + 1):
        for start in range(end):
            cost = best[start] + (end - start) * lengths[order[end - 1]] + overhead
            if cost < best[end]:
                best[end], cut[end] = cost, start
    groups, end = [], len(order)
    while end > 0:
        groups.append(order[cut[end]: end])
        end = cut[end]
    return groups[::-1]
