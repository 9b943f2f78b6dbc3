"""Teachers with other tokenizers: aligned through byte offsets, projected into the student's vocabulary.

Per batch and teacher (docs/CROSS_TOKENIZER.md):
1. each row's text (the bytes of the student's tokens) is tokenized by the teacher, and student
   positions are matched with teacher positions whose next tokens start at the same byte
   (align/alignment.py: one pass per row);
2. the teacher runs on its own ids, whole or ZeRO-3 sharded as in training; its logits are cut to
   its own tokenizer's size (padded embedding rows never reach a softmax);
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
from functools import lru_cache

import torch
from accelerate import Accelerator
from torch import Tensor, nn
from transformers import PreTrainedTokenizerBase

from merge_distill import distributed as dist_mod
from merge_distill.align import TokenBytes, align_row
from merge_distill.align.projection import project_topk, token_map
from merge_distill.models import compare_vocabs, cut_vocab, load_teachers, load_tokenizer, tokenizer_source
from merge_distill.schema import SELF_TEACHER, Recipe
from merge_distill.signals import IGNORE_INDEX, TokenBatch, normalizes_in_place, per_token_stats
from merge_distill.sources.base import SourceContext, register_source
from merge_distill.sources.signals import SparseSignals, check_finite


@lru_cache(maxsize=16)
def _differs(student: tuple[str, str | None], teacher: tuple[str, str | None]) -> bool:
    try:
        return bool(compare_vocabs(load_tokenizer(*student), load_tokenizer(*teacher)))
    except Exception:  # noqa: BLE001  unreadable tokenizers are reported by the file checks
        return False


def cross_tokenizer_teachers(recipe: Recipe) -> list[str]:
    """Names of the teachers whose tokenizer differs from the student's (a `self` teacher never does)."""
    student = tokenizer_source(recipe)[:2]
    return [t.name for t in recipe.teachers if t.model != SELF_TEACHER and _differs(student, (t.model, t.revision))]


def _selects(recipe: Recipe) -> bool:
    return (recipe.cache is None or not recipe.cache.use) and (recipe.align.force or bool(cross_tokenizer_teachers(recipe)))


@register_source("aligned", {"gold_nll", "entropy", "top1", "hidden"}, _selects,
                 "teachers with other tokenizers run on their own tokens of the same text, aligned through byte "
                 "offsets, top-k projected into the student's vocabulary")
class AlignedTeachers:
    def __init__(self, names: list[str], models: list[nn.Module], tokenizers: list[PreTrainedTokenizerBase],
                 student_tokenizer: PreTrainedTokenizerBase, k: int, temperature: float, chunk_tokens: int,
                 aligned: list[bool]):
        self.names = names
        self.models = models
        self.student_bytes = TokenBytes(student_tokenizer)
        self.teacher_bytes = [TokenBytes(t) for t in tokenizers]
        self.maps = [token_map(tb, self.student_bytes) for tb in self.teacher_bytes]
        self.vocab_sizes = [len(t) for t in tokenizers]
        self.student_vocab = len(student_tokenizer)
        self.k, self.temperature, self.chunk_tokens = k, temperature, chunk_tokens
        self.aligned = aligned  # per teacher: through the alignment (else: the student's own ids)

    @classmethod
    def open(cls, recipe: Recipe, accelerator: Accelerator, student_tokenizer: PreTrainedTokenizerBase,
             student: nn.Module | None = None, names: list[str] | None = None) -> "AlignedTeachers":
        """Load and place the recipe's teachers (those in `names`, default all), each with its tokenizer."""
        wanted = [t for t in recipe.teachers if names is None or t.name in names]
        dist = recipe.distributed
        models = load_teachers(recipe, wanted, student,
                               lambda dtype: dist_mod.teacher_init_context(accelerator, dist, dtype))
        placed = [dist_mod.prepare_teacher(accelerator, dist, m) for m in models]
        cross = set(cross_tokenizer_teachers(recipe))
        tokenizers = [load_tokenizer(t.model, t.revision, t.trust_remote_code) if t.name in cross else student_tokenizer
                      for t in wanted]
        aligned = [recipe.align.force or t.name in cross for t in wanted]
        return cls([t.name for t in wanted], placed, tokenizers, student_tokenizer, recipe.align.k,
                   recipe.loss.temperature, recipe.train.chunk_tokens, aligned)

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
            nbytes = torch.tensor([[len(p) for p in self.student_bytes(row[1:].tolist())] + [0]
                                   for row in batch.input_ids.cpu()], device=device, dtype=torch.float32)
            return batch.input_ids, batch.attention_mask, position, nbytes, batch.targets
        rows = []
        for b in range(B):
            ids = batch.input_ids[b][batch.attention_mask[b].bool()].tolist()
            rows.append(align_row(ids, self.student_bytes, self.teacher_bytes[j]))
        width = max(len(r.teacher_ids) for r in rows)
        pad = self.teacher_bytes[j].tokenizer.pad_token_id or 0
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
        for j, model in enumerate(self.models):
            ids, attention, _, nbytes, next_ids = self._teacher_batch(batch, j)
            logits = cut_vocab(model(input_ids=ids, attention_mask=attention, use_cache=False).logits,
                               self.vocab_sizes[j])
            scored = (nbytes > 0) & (next_ids != IGNORE_INDEX)
            nll, _, _ = per_token_stats(logits, next_ids.masked_fill(~scored, IGNORE_INDEX), self.chunk_tokens,
                                        with_top1=False)
            out.append(torch.stack([nll.double().sum(), scored.double().sum(), nbytes.double()[scored].sum()]))
        return torch.stack(out).cpu()

    @torch.inference_mode()
    def signals(self, batch: TokenBatch) -> SparseSignals:
        """batch [B, T] -> per teacher: top-k ids / log-probs [B, T, k] and tail [B, T] in the student's
        vocabulary, gold NLL and entropy per byte [B, T, K], coverage [B, T, K]."""
        targets = batch.targets
        B, T = targets.shape
        device = targets.device
        valid = targets != IGNORE_INDEX
        k = min(self.k, self.student_vocab)
        out_ids, out_lp, out_tail, nll, ent, covered, widths = [], [], [], [], [], [], []
        for j, model in enumerate(self.models):
            ids, attention, position, nbytes, next_ids = self._teacher_batch(batch, j)
            logits = cut_vocab(model(input_ids=ids, attention_mask=attention, use_cache=False).logits,
                               self.vocab_sizes[j])
            where = (position >= 0) & valid                                           # [B, T]
            rows = torch.nonzero(where, as_tuple=True)
            picked = position[rows]                                                   # teacher positions
            top_ids = torch.zeros(B, T, k, dtype=torch.long, device=device)
            top_lp = torch.full((B, T, k), -math.inf, device=device)
            tail = torch.zeros(B, T, device=device)  # log 1: where a teacher has no target, all its mass is tail
            n_j = torch.zeros(B, T, device=device)
            e_j = torch.zeros(B, T, device=device)
            w_j = torch.zeros(B, T, device=device)
            kj = min(k, logits.shape[-1])
            for s in range(0, picked.numel(), self.chunk_tokens):
                sl = slice(s, s + self.chunk_tokens)
                chunk_rows = (rows[0][sl], rows[1][sl])
                # one chunk of aligned rows [chunk, V_j], gathered: our own copy, free to overwrite
                x = logits[rows[0][sl], picked[sl]].float()
                gold = next_ids[rows[0][sl], picked[sl]]
                # float32: x becomes log-probs at temperature 1 in place (one log-softmax pass serves both)
                n, e, _ = per_token_stats(x.unsqueeze(0), gold.unsqueeze(0), self.chunk_tokens, in_place=True,
                                          with_top1=False)
                span = nbytes[rows[0][sl], picked[sl]].clamp_min(1.0)
                w_j[chunk_rows] = span
                n_j[chunk_rows], e_j[chunk_rows] = n[0] / span, e[0] / span           # per byte of the teacher's token
                if self.temperature == 1.0 and normalizes_in_place(x):
                    logp = x
                else:
                    logp = torch.log_softmax(x / self.temperature, -1)
                values, teacher_ids = logp.topk(kj, -1)
                # the tail exactly: logsumexp over the tokens outside the top k (never 1 - sum)
                rest = torch.logsumexp(logp.scatter_(-1, teacher_ids, -math.inf), -1)
                if self.aligned[j]:
                    sid, slp, stail = project_topk(teacher_ids, values, rest, self.maps[j])
                else:
                    sid, slp, stail = teacher_ids, values, rest
                top_ids[chunk_rows] = torch.nn.functional.pad(sid, (0, k - kj), value=0) if kj < k else sid
                top_lp[chunk_rows] = torch.nn.functional.pad(slp, (0, k - kj), value=-math.inf) if kj < k else slp
                tail[chunk_rows] = stail
            del logits
            out_ids.append(top_ids)
            out_lp.append(top_lp)
            out_tail.append(tail)
            nll.append(n_j)
            ent.append(e_j)
            covered.append(where)
            widths.append(w_j)
        check_finite(self.names, nll, ent)
        return SparseSignals(self.names, out_ids, out_lp, out_tail, torch.stack(nll, -1), torch.stack(ent, -1),
                             torch.stack(covered, -1), torch.stack(widths, -1))
