"""Reading the cache: rows by (source label, row index), and the cached teachers of a run."""

from __future__ import annotations

import math
from dataclasses import dataclass
from itertools import combinations
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor

from merge_distill.cache.manifest import VALUE_DTYPES, full_manifest, read_manifest, recipe_problems
from merge_distill.errors import UserError
from merge_distill.losses.sparse import bucket_layout, teacher_table
from merge_distill.signals import IGNORE_INDEX, TokenBatch

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from merge_distill.data import SourceRows
    from merge_distill.recipe import Recipe


@dataclass
class SparseTeacherSignals:
    """What the cache says about one micro-batch (the sparse counterpart of TeacherSignals).

    topk_ids: K tensors [B, T, k] int32; topk_logprobs: K tensors [B, T, k] (storage dtype) at
    the loss temperature; tail_logprobs: K tensors [B, T] float32; gold_nll, entropy [B, T, K]
    float32 at temperature 1 (0 where target is -100); top1 [B, T, K] long (each teacher's argmax,
    computed when asked: the step needs none).
    """

    names: list[str]
    topk_ids: list[Tensor]
    topk_logprobs: list[Tensor]
    tail_logprobs: list[Tensor]
    gold_nll: Tensor
    entropy: Tensor

    @property
    def top1(self) -> Tensor:
        return torch.stack([ids[..., 0].long() for ids in self.topk_ids], -1)  # the lists are ordered by log-prob


class TeacherCache:
    """Read access to a complete cache: rows by (source label, row index), shards memory-mapped."""

    def __init__(self, root: Path, manifest: dict[str, Any]):
        self.root = root
        self.manifest = manifest
        self.k, self.dtype, self.seq_len = int(manifest["k"]), str(manifest["dtype"]), int(manifest["seq_len"])
        self.num_teachers = len(manifest["teachers"])
        self.sources = {s["label"]: s for s in manifest["sources"]}
        self._tables: dict[tuple[str, int], Any] = {}

    def _table(self, label: str, shard: int) -> Any:
        key = (label, shard)
        if key not in self._tables:
            import datasets

            path = self.root / "sources" / self.sources[label]["folder"] / f"shard-{shard:05d}"
            self._tables[key] = datasets.load_from_disk(str(path)).data.table  # memory-mapped Arrow
        return self._tables[key]

    def read(self, labels: list[str], rows: list[int]) -> dict[str, list[Tensor]]:
        """B (label, row) pairs -> {"ids", "values", "tail", "nll", "entropy"}: K tensors each,
        [B, T, k] for ids/values, [B, T] for the rest (CPU, values in the storage dtype)."""
        import pyarrow as pa

        per_shard = int(self.manifest["rows_per_shard"])
        groups: dict[tuple[str, int], list[tuple[int, int]]] = {}
        for position, (label, row) in enumerate(zip(labels, rows)):
            groups.setdefault((label, row // per_shard), []).append((position, row % per_shard))
        out: dict[str, list[np.ndarray | None]] = {f: [None] * self.num_teachers for f in ("ids", "values", "tail", "nll", "entropy")}
        for (label, shard), picks in groups.items():
            taken = self._table(label, shard).take(pa.array([offset for _, offset in picks]))
            where = [position for position, _ in picks]
            for field, targets in out.items():
                for j in range(self.num_teachers):
                    values = taken.column(f"t{j}_{field}").combine_chunks().flatten().to_numpy().reshape(len(picks), -1)
                    if targets[j] is None:
                        targets[j] = np.empty((len(rows), values.shape[1]), dtype=values.dtype)
                    targets[j][where] = values
        result: dict[str, list[Tensor]] = {}
        for field, arrays in out.items():
            shape = (len(rows), self.seq_len, self.k) if field in ("ids", "values") else (len(rows), self.seq_len)
            tensors = [torch.from_numpy(a).view(shape) for a in arrays]  # type: ignore[arg-type]
            if field == "values" and self.dtype != "float32":
                tensors = [t.view(VALUE_DTYPES[self.dtype]) for t in tensors]  # int16 bits -> 16-bit floats
            result[field] = tensors
        return result


class CachedTeacherEnsemble:
    """The teachers, answered from the cache: same `signals(batch, targets)` call as TeacherEnsemble."""

    def __init__(self, names: list[str], cache: TeacherCache):
        self.names = names
        self.cache = cache
        self.models: list[Any] = []  # no teacher is loaded

    def signals(self, batch: TokenBatch, targets: Tensor) -> SparseTeacherSignals:
        from merge_distill.teachers import NonFiniteError

        if batch.row_index is None:
            raise ValueError("a cached run needs batches that carry their source rows (TokenBatch.row_index)")
        data = self.cache.read(batch.sources, batch.row_index)
        # Checked on the CPU tensors as read, before they move: no device sync per teacher.
        bad = [n for j, n in enumerate(self.names)
               if not (torch.isfinite(data["nll"][j]).all() and torch.isfinite(data["entropy"][j]).all())]
        if bad:
            raise NonFiniteError(f"teacher {', '.join(repr(n) for n in bad)} has NaN/inf in the cache")
        device = targets.device
        valid = targets != IGNORE_INDEX
        # The stored NLL/entropy are 0 where the source row has no target; the batch's targets decide.
        nll = torch.stack([torch.where(valid, t.to(device), 0.0) for t in data["nll"]], -1)
        entropy = torch.stack([torch.where(valid, t.to(device), 0.0) for t in data["entropy"]], -1)
        return SparseTeacherSignals(
            self.names, [t.to(device) for t in data["ids"]], [t.to(device) for t in data["values"]],
            [t.to(device) for t in data["tail"]], nll, entropy)


def open_cache(recipe: "Recipe", tokenizer: "PreTrainedTokenizerBase", sources: list["SourceRows"]) -> CachedTeacherEnsemble:
    """The run's cached teachers, after checking every manifest field (UserError naming each difference)."""
    section = recipe.cache
    assert section is not None and section.use
    root = Path(section.dir)
    problems = recipe_problems(recipe, check_files=True, expected=full_manifest(recipe, tokenizer, sources))
    if problems:
        raise UserError(problems)
    return CachedTeacherEnsemble(recipe.teacher_names, TeacherCache(root, read_manifest(root)))  # type: ignore[arg-type]


@torch.no_grad()
def sparse_agreement(signals: SparseTeacherSignals, mask: Tensor, vocab_size: int,
                     max_tokens: int = 64) -> tuple[Tensor, Tensor, int]:
    """Pairwise teacher agreement from the cache, on up to max_tokens evenly spaced valid tokens.

    top-1 agreement is exact (the stored ids are ordered by log-prob, the first is the argmax). JS is an
    approximation: it is taken on the buckets of the pair's top-k union + one bucket for all
    other tokens, each teacher's unlisted tokens at its even tail share (losses/sparse.py);
    exact when k = V. Returns (top1 counts [P], JS sums [P], tokens) for
    BlendStats.add_agreement.
    """
    from merge_distill.report.stats import agreement_positions, pairwise_js

    K = len(signals.names)
    pairs = list(combinations(range(K), 2))
    top1 = torch.zeros(len(pairs), dtype=torch.float64)
    js = torch.zeros_like(top1)
    positions = agreement_positions(mask, max_tokens)
    if not pairs or positions.numel() == 0:
        return top1, js, 0
    k = signals.topk_ids[0].shape[-1]
    ids = [t.reshape(-1, k)[positions].long() for t in signals.topk_ids]
    values = [t.reshape(-1, k)[positions].float() for t in signals.topk_logprobs]
    tails = [t.reshape(-1)[positions].float() for t in signals.tail_logprobs]
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
    return top1, js, int(positions.numel())
