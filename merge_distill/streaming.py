"""Streamed sources (`streaming: true`): rows tokenized and packed on the fly, in a fixed order.

For corpora larger than the disk budget nothing is tokenized ahead or stored: `datasets` streams
the examples (hub shards fetched as they are read, local files read in place), they are tokenized
MAP_BATCH at a time and packed into rows of seq_len exactly as the stored path packs them
(rowstore.pack).

The order is a pure function of the recipe: pass p over the source reads the stream through
`IterableDataset.shuffle(seed=train.seed, buffer_size=STREAM_BUFFER)` at epoch p (datasets
shuffles the shard order and draws from a buffer of 10,000 examples with a generator seeded by
seed + p), and the rows of passes 0, 1, 2, ... follow each other. The k-th row a run draws from
the source (counted over the whole run and every process, data.MixedStream) is row k of that
sequence. So the step -> rows mapping needs no state: resuming at step s reads the stream again
up to the first row step s needs (tokenizing without training), and every process reads the
whole stream and keeps the rows that are its own.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator

import datasets
import numpy as np
import torch
from transformers import PreTrainedTokenizerBase

from merge_distill.data import RowTensors, SourceRows, TokenizeBatch, load_source, read_error
from merge_distill.errors import UserError
from merge_distill.rowstore import MAP_BATCH, pack, row_pad_id, rows_fingerprint
from merge_distill.schema import DataSource

STREAM_BUFFER = 10_000  # examples in the shuffle buffer
Row = tuple[np.ndarray, np.ndarray, int]  # ids [seq_len] uint32, target [seq_len] bool, tokens before padding


class StreamRows:
    """One streamed source's rows in stream order: `take(index)` with index = draw counters.

    Reading forward wastes nothing; a row behind the current position starts the stream again
    from pass 0 and reads up to it (a resume does that once)."""

    def __init__(self, source: DataSource, key: str, tokenizer: PreTrainedTokenizerBase, seq_len: int,
                 packing: bool, seed: int):
        self.source, self.key, self.tokenizer = source, key, tokenizer
        self.label, self.domain = source.label, source.domain
        self.seq_len, self.packing, self.seed = seq_len, packing, seed
        self.pad_id = row_pad_id(tokenizer)
        self.digest = rows_fingerprint(source, tokenizer, seq_len, packing, f"stream seed {seed}")[:20]
        self._restart()
        self._first = self._row(0)  # read now: a stream that gives no row fails at `validate`

    def _restart(self) -> None:
        self._rows = itertools.chain.from_iterable(self._pass(p) for p in itertools.count())
        self._position = 0  # the index of the row self._rows yields next

    def _examples(self, epoch: int) -> datasets.IterableDataset:
        try:
            stream = load_source(self.source, streaming=True)
        except Exception as exc:  # datasets raises several types for a source it cannot open
            raise read_error(self.source, self.key, exc) from None
        stream = stream.shuffle(seed=self.seed, buffer_size=STREAM_BUFFER)
        stream.set_epoch(epoch)
        return stream.take(self.source.max_examples) if self.source.max_examples else stream

    def _batches(self, epoch: int) -> Iterator[dict[str, list]]:
        examples = self._examples(epoch).iter(batch_size=MAP_BATCH)
        while True:
            try:
                batch = next(examples)
            except StopIteration:
                return
            except Exception as exc:  # a parse error surfaces while reading
                raise read_error(self.source, self.key, exc) from None
            if self.source.field not in batch:
                raise UserError(f"{self.key}.field: {self.source.path} has no column {self.source.field!r}; "
                                f"its columns are: {', '.join(batch)}")
            yield batch

    def _blocks(self, epoch: int) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """Tokenized examples of one pass as rowstore.pack takes them: ids uint32 [n_tokens],
        target bool [n_tokens], offsets int64 [n_examples + 1]."""
        tokenize, seen = None, 0
        for batch in self._batches(epoch):
            values = batch[self.source.field]
            if tokenize is None:
                chat = self.source.format == "chat" or (self.source.format == "auto" and isinstance(values[0], list))
                tokenize = TokenizeBatch(self.source, self.key, self.tokenizer, chat)
            out = tokenize(batch, list(range(seen, seen + len(values))))
            seen += len(values)
            ids = [np.asarray(x, np.uint32) for x in out["ids"]]
            flat = np.concatenate(ids) if ids else np.empty(0, np.uint32)
            target = (np.concatenate([np.asarray(t, bool) for t in out["target"]]) if "target" in out and ids
                      else np.ones(len(flat), bool))
            yield flat, target, np.concatenate([[0], np.cumsum([len(x) for x in ids], dtype=np.int64)])

    def _pass(self, epoch: int) -> Iterator[Row]:
        rows = 0
        for ids, target, length, _ in pack(self._blocks(epoch), self.seq_len, self.packing, self.pad_id):
            for i in range(len(ids)):
                rows += 1
                yield ids[i], target[i], int(length[i])
        if rows == 0:
            raise UserError(f"{self.key}: the stream of {self.source.path} gives no row; give a source with text")

    def _row(self, k: int) -> Row:
        if k == 0 and hasattr(self, "_first"):
            return self._first
        if k < self._position:
            self._restart()
        for _ in range(k - self._position):  # rows drawn by other processes (or before a resume)
            next(self._rows)
        self._position = k + 1
        return next(self._rows)

    def take(self, index: "torch.Tensor | list[int] | range | slice") -> RowTensors:
        """Rows `index` (draw counters) as long tensors [n, seq_len]; a slice counts from row 0."""
        if isinstance(index, slice):
            index = range(*index.indices(index.stop or 0))
        wanted = index.tolist() if isinstance(index, torch.Tensor) else list(index)
        found = {k: self._row(k) for k in sorted(set(wanted))}
        return _tensors([found[k] for k in wanted], self.seq_len)

    def head(self, max_targets: int) -> SourceRows:
        """The first rows of pass 0, up to `max_targets` training targets, as in-memory SourceRows
        (held-out evaluation reads no further)."""
        rows, targets = [], 0
        for row in self._pass(0):
            rows.append(row)
            targets += int(row[1][1:row[2]].sum())
            if targets >= max_targets:
                break
        ids, labels, mask = _tensors(rows, self.seq_len)
        return SourceRows.from_tensors(self.label, self.domain, ids, labels, mask)


def _tensors(rows: list[Row], seq_len: int) -> RowTensors:
    """Rows read from the stream -> RowTensors [n, seq_len]."""
    if not rows:
        return RowTensors.from_arrays(np.empty((0, seq_len)), np.empty((0, seq_len)), np.empty(0), seq_len)
    return RowTensors.from_arrays(np.stack([r[0] for r in rows]), np.stack([r[1] for r in rows]),
                                  np.array([r[2] for r in rows]), seq_len)
