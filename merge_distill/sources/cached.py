"""Cached teachers: the offline cache answers for the models (`cache.use: true`); none is loaded.

`merge-distill cache` wrote each teacher's top-k log-probs, tail mass, gold NLL and entropy per
source row (merge_distill/cache); a batch reads its rows by (source label, row index). Teachers
aligned across tokenizers were stored in their own vocabularies with their spans: they are
projected into the student's here, exactly as the aligned source does online. A cache of hidden
states (`cache.store: hidden`) gives each teacher's full distribution back: its logits are made
from the stored hidden states and head, one chunk at a time (HeadLogits), and the dense loss runs.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor
from transformers import PreTrainedTokenizerBase

from merge_distill.align import TokenBytes
from merge_distill.align.projection import token_map

from merge_distill.cache.manifest import full_manifest, read_manifest, recipe_problems
from merge_distill.cache.reader import TeacherCache
from merge_distill.data import SourceRows
from merge_distill.errors import NonFiniteError, UserError
from merge_distill.schema import Recipe
from merge_distill.signals import IGNORE_INDEX, TokenBatch
from merge_distill.sources.aligned import AlignedTargets, projected_signals, teacher_tokenizers
from merge_distill.sources.base import SourceContext, register_source
from merge_distill.losses.fused import HeadLogits
from merge_distill.sources.signals import DenseSignals, SparseSignals


def _uses_cache(recipe: Recipe) -> bool:
    return recipe.cache is not None and recipe.cache.use


@register_source("cache", {"gold_nll", "entropy", "top1", "hidden"}, _uses_cache,
                 "top-k + tail targets read from the offline cache (`merge-distill cache`); no teacher is loaded")
class CachedTeachers:
    """The teachers, answered from the cache."""

    def __init__(self, names: list[str], cache: TeacherCache, maps: list[Tensor | None] | None = None,
                 chunk_tokens: int = 1024):
        self.names = names
        self.cache = cache
        self.chunk_tokens = chunk_tokens
        self.heads = cache.heads() if cache.store == "hidden" else None  # [(weight [V, H], soft-cap)]
        # per teacher: its token map into the student's vocabulary when the cache holds its top-k in
        # its own (aligned across tokenizers); None: the student's vocabulary. maps None: no alignment.
        self.maps = maps

    @classmethod
    def open(cls, recipe: Recipe, tokenizer: PreTrainedTokenizerBase, rows: list[SourceRows]) -> "CachedTeachers":
        """The run's cached teachers, after checking every manifest field (UserError naming each difference)."""
        assert recipe.cache is not None and recipe.cache.use
        root = Path(recipe.cache.dir)
        problems = recipe_problems(recipe, check_files=True, expected=full_manifest(recipe, tokenizer, rows))
        if problems:
            raise UserError(problems)
        manifest = read_manifest(root)
        assert manifest is not None
        maps = None
        if manifest["aligned"]:
            student = TokenBytes(tokenizer)
            maps = [token_map(TokenBytes(own), student) if t.name in manifest["aligned"] else None
                    for t, own in zip(recipe.teachers, teacher_tokenizers(recipe, recipe.teachers, tokenizer))]
        return cls(recipe.teacher_names, TeacherCache(root, manifest), maps, recipe.train.chunk_tokens)

    @classmethod
    def for_training(cls, recipe: Recipe, context: SourceContext) -> "CachedTeachers":
        return cls.open(recipe, context.tokenizer, context.rows)

    def held_bytes(self) -> list[tuple[int, int]]:
        return [(0, 0) for _ in self.names]  # no teacher weights in memory

    def signals(self, batch: TokenBatch) -> SparseSignals | DenseSignals:
        if batch.row_index is None:
            raise ValueError("a cached run needs batches that carry their source rows (TokenBatch.row_index)")
        data = self.cache.read(batch.sources, batch.row_index)
        # Checked on the CPU tensors as read, before they move: no device sync per teacher.
        bad = [n for j, n in enumerate(self.names)
               if not (torch.isfinite(data["nll"][j]).all() and torch.isfinite(data["entropy"][j]).all())]
        if bad:
            raise NonFiniteError(f"teacher {', '.join(repr(n) for n in bad)} has NaN/inf in the cache")
        targets = batch.targets
        device = targets.device
        valid = targets != IGNORE_INDEX
        if self.maps is not None:  # top-k in each teacher's own vocabulary, with its span
            aligned = [AlignedTargets(
                ids=data["ids"][j].to(device).long(), logprobs=data["values"][j].to(device).float(),
                tail=data["tail"][j].to(device), gold_nll=torch.where(valid, data["nll"][j].to(device), 0.0),
                entropy=torch.where(valid, data["entropy"][j].to(device), 0.0),
                span=torch.where(valid, data["span"][j].to(device), -1)) for j in range(len(self.names))]
            return projected_signals(self.names, aligned, self.maps, self.cache.k)
        # The stored NLL/entropy are 0 where the source row has no target; the batch's targets decide.
        nll = torch.stack([torch.where(valid, t.to(device), 0.0) for t in data["nll"]], -1)
        entropy = torch.stack([torch.where(valid, t.to(device), 0.0) for t in data["entropy"]], -1)
        if self.heads is not None:  # hidden states: every teacher's full distribution, made per chunk
            heads = [HeadLogits(h.to(device), weight.to(device), weight.shape[0], cap, self.chunk_tokens)
                     for h, (weight, cap) in zip(data["hidden"], self.heads)]
            return DenseSignals(self.names, heads, nll, entropy)  # type: ignore[arg-type]
        return SparseSignals(
            self.names, [t.to(device) for t in data["ids"]], [t.to(device) for t in data["values"]],
            [t.to(device) for t in data["tail"]], nll, entropy)
