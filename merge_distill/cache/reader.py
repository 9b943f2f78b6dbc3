"""Reading the cache: rows by (source label, row index), shards memory-mapped (sources/cached.py uses it)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import datasets
import numpy as np
import pyarrow as pa
import torch
from safetensors import safe_open
from torch import Tensor

from merge_distill.cache import codec
from merge_distill.cache.manifest import HEADS_FILE, REWRITE_SHARD, corrupt_shard
from merge_distill.errors import UserError


class TeacherCache:
    """Read access to a complete cache: rows by (source label, row index), shards memory-mapped.

    Each shard's bytes are checked against the manifest's checksum when this process first opens
    it; a corrupt or missing shard is a UserError naming it and how to rewrite it."""

    def __init__(self, root: Path, manifest: dict[str, Any]):
        self.root = root
        self.manifest = manifest
        self.k, self.dtype, self.seq_len = int(manifest["k"]), str(manifest["dtype"]), int(manifest["seq_len"])
        self.num_teachers = len(manifest["teachers"])
        self.id_bits = [int(b) for b in manifest["id_bits"]]
        self.adaptive = float(manifest["mass"]) < 1.0
        self.store = str(manifest["store"])
        self.hidden_sizes = [int(h) for h in manifest.get("hidden_sizes", [])]
        # with teachers aligned across tokenizers every teacher also has its span (-1: not aligned);
        # hidden states have their per-position scale instead of a tail
        self.fields = (("scale", "nll", "entropy") if self.store == "hidden"
                       else ("tail", "nll", "entropy") + (("span",) if manifest["aligned"] else ()))
        self.sources = {s["label"]: s for s in manifest["sources"]}
        self._tables: dict[tuple[str, int], Any] = {}

    def _table(self, label: str, shard: int) -> Any:
        key = (label, shard)
        if key not in self._tables:
            name = f"sources/{self.sources[label]['folder']}/shard-{shard:05d}"
            problem = corrupt_shard(self.root, self.manifest, name)
            if problem:
                raise UserError(f"{problem}; {REWRITE_SHARD}")
            self._tables[key] = datasets.load_from_disk(str(self.root / name)).data.table  # memory-mapped Arrow
        return self._tables[key]

    def heads(self) -> list[tuple[Tensor, float | None]]:
        """store "hidden": each teacher's head weight [V, H] and soft-cap (None: none), checked
        against the manifest's checksum first (a UserError naming the file when it differs)."""
        problem = corrupt_shard(self.root, self.manifest, HEADS_FILE)
        if problem:
            raise UserError(f"{problem}; delete that file and run `merge-distill cache RECIPE`, which writes it again")
        with safe_open(str(self.root / HEADS_FILE), "pt") as f:
            caps = f.metadata() or {}
            return [(f.get_tensor(f"t{j}"), float(caps[f"t{j}_softcap"]) if caps.get(f"t{j}_softcap") else None)
                    for j in range(self.num_teachers)]

    def read(self, labels: list[str], rows: list[int]) -> dict[str, list[Tensor]]:
        """B (label, row) pairs -> {"ids", "values", "tail", "nll", "entropy"} (+ "span" when teachers
        are aligned across tokenizers): K tensors each, ids [B, T, k] int64 and values [B, T, k]
        float32 (-inf past the entries kept), [B, T] for the rest (CPU). store "hidden":
        {"hidden" [B, T, H] float32, "scale", "nll", "entropy" [B, T]} instead."""
        per_shard = int(self.manifest["rows_per_shard"])
        B, T, k = len(rows), self.seq_len, self.k
        out: dict[str, list[Tensor]] = {f: [torch.empty(B, T) for _ in range(self.num_teachers)] for f in self.fields}
        if "span" in out:
            out["span"] = [torch.empty(B, T, dtype=torch.int32) for _ in range(self.num_teachers)]
        if self.store == "hidden":
            out["hidden"] = [torch.empty(B, T, h) for h in self.hidden_sizes]
        else:
            out["ids"] = [torch.empty(B, T, k, dtype=torch.long) for _ in range(self.num_teachers)]
            out["values"] = [torch.empty(B, T, k) for _ in range(self.num_teachers)]
        groups: dict[tuple[str, int], list[tuple[int, int]]] = {}
        for position, (label, row) in enumerate(zip(labels, rows)):
            groups.setdefault((label, row // per_shard), []).append((position, row % per_shard))
        for (label, shard), picks in groups.items():
            taken = self._table(label, shard).take(pa.array([offset for _, offset in picks]))
            where = [position for position, _ in picks]
            for j in range(self.num_teachers):
                for field in self.fields:
                    values = taken.column(f"t{j}_{field}").combine_chunks().flatten().to_numpy()
                    out[field][j][where] = torch.from_numpy(values.reshape(len(picks), T).copy()).to(out[field][j].dtype)
                if self.store == "hidden":
                    column = taken.column(f"t{j}_hidden")
                    for i, position in enumerate(where):
                        out["hidden"][j][position] = codec.decode_hidden(column[i].as_py(), out["scale"][j][position].numpy(),
                                                                         self.hidden_sizes[j])
                    continue
                counts = (taken.column(f"t{j}_n").combine_chunks().flatten().to_numpy().reshape(len(picks), T)
                          if self.adaptive else np.full((len(picks), T), k))
                ids_col, values_col = taken.column(f"t{j}_ids"), taken.column(f"t{j}_values")
                for i, position in enumerate(where):
                    ids, values = codec.decode_row(ids_col[i].as_py(), values_col[i].as_py(), counts[i], k, self.dtype,
                                                   self.id_bits[j])
                    out["ids"][j][position], out["values"][j][position] = ids, values
        return out
