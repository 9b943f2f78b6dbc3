"""Reading the cache: rows by (source label, row index), shards memory-mapped (sources/cached.py uses it)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import datasets
import numpy as np
import pyarrow as pa
import torch
from torch import Tensor

from merge_distill.cache.manifest import VALUE_DTYPES


class TeacherCache:
    """Read access to a complete cache: rows by (source label, row index), shards memory-mapped."""

    def __init__(self, root: Path, manifest: dict[str, Any]):
        self.root = root
        self.manifest = manifest
        self.k, self.dtype, self.seq_len = int(manifest["k"]), str(manifest["dtype"]), int(manifest["seq_len"])
        self.num_teachers = len(manifest["teachers"])
        # with teachers aligned across tokenizers every teacher also has its span (-1: not aligned)
        self.fields = ("ids", "values", "tail", "nll", "entropy") + (("span",) if manifest["aligned"] else ())
        self.sources = {s["label"]: s for s in manifest["sources"]}
        self._tables: dict[tuple[str, int], Any] = {}

    def _table(self, label: str, shard: int) -> Any:
        key = (label, shard)
        if key not in self._tables:
            path = self.root / "sources" / self.sources[label]["folder"] / f"shard-{shard:05d}"
            self._tables[key] = datasets.load_from_disk(str(path)).data.table  # memory-mapped Arrow
        return self._tables[key]

    def read(self, labels: list[str], rows: list[int]) -> dict[str, list[Tensor]]:
        """B (label, row) pairs -> {"ids", "values", "tail", "nll", "entropy"} (+ "span" when teachers
        are aligned across tokenizers): K tensors each, [B, T, k] for ids/values, [B, T] for the rest
        (CPU, values in the storage dtype)."""
        per_shard = int(self.manifest["rows_per_shard"])
        groups: dict[tuple[str, int], list[tuple[int, int]]] = {}
        for position, (label, row) in enumerate(zip(labels, rows)):
            groups.setdefault((label, row // per_shard), []).append((position, row % per_shard))
        out: dict[str, list[np.ndarray | None]] = {f: [None] * self.num_teachers for f in self.fields}
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
