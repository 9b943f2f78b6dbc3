"""Data: sources -> tokenized rows of seq_len -> a seeded, weighted mix of TokenBatches.

`datasets` does all reading (text, jsonl, parquet, hub). Text examples are targets on every
token; chat examples go through the tokenizer's chat template and only assistant tokens are
targets (others -100). Each row keeps its source's domain tag through to the batch.
"""

from __future__ import annotations

import glob
import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import datasets
import numpy as np
import torch
from torch import Tensor
from transformers import PreTrainedTokenizerBase

from merge_distill.errors import UserError
from merge_distill.signals import IGNORE_INDEX, TokenBatch

from merge_distill.schema import DataSource

datasets.disable_progress_bars()
# datasets logs a parse error before raising it; the raised error is reported in the user's words.
datasets.logging.set_verbosity(datasets.logging.CRITICAL)

_BUILDERS = {"text": "text", "jsonl": "json", "parquet": "parquet"}


def source_files(path: str) -> list[str]:
    """Files named by a data source path: a file, a directory (all files inside) or a glob."""
    p = Path(path)
    if p.is_dir():
        return sorted(str(f) for f in p.rglob("*") if f.is_file() and not f.name.startswith("."))
    return sorted(glob.glob(path)) if any(c in path for c in "*?[") else ([path] if p.is_file() else [])



def rows_features(seq_len: int) -> datasets.Features:
    """The stored row columns: ids, the target mask, tokens before padding, shifted targets."""
    return datasets.Features({"input_ids": datasets.Sequence(datasets.Value("uint32"), length=seq_len),
                              "target": datasets.Sequence(datasets.Value("bool"), length=seq_len),
                              "length": datasets.Value("int32"), "targets": datasets.Value("int32")})


class RowTensors(NamedTuple):
    """Rows as the model takes them: input_ids, labels (-100: no target), attention_mask, each [n, seq_len] long."""

    input_ids: Tensor
    labels: Tensor
    attention_mask: Tensor

    @classmethod
    def from_arrays(cls, ids: np.ndarray, target: np.ndarray, length: np.ndarray, seq_len: int) -> "RowTensors":
        """Stored columns (ids [n, seq_len] uint32, target [n, seq_len] bool, length [n]) -> RowTensors."""
        if len(ids) == 0:
            blank = torch.zeros(0, seq_len, dtype=torch.long)
            return cls(blank, blank.clone(), blank.clone())
        ids_t = torch.from_numpy(np.asarray(ids).astype(np.int64))
        target_t = torch.from_numpy(np.asarray(target).astype(bool))
        mask = torch.arange(seq_len)[None, :] < torch.from_numpy(np.asarray(length).astype(np.int64))[:, None]
        return cls(ids_t, torch.where(target_t, ids_t, IGNORE_INDEX), mask.long())


@dataclass
class SourceRows:
    """All rows of one source, memory-mapped from Arrow (see rowstore): read them with `take`.

    `digest` identifies the rows' contents (the cache manifest records it)."""

    label: str
    domain: str
    table: datasets.Dataset
    pad_id: int
    digest: str

    def __post_init__(self) -> None:
        self.table = self.table.with_format("numpy")

    def __len__(self) -> int:
        return len(self.table)

    @property
    def seq_len(self) -> int:
        return self.table.features["input_ids"].length

    def take(self, index: "Tensor | list[int] | range | slice") -> RowTensors:
        """Rows `index` (positions in this source) as long tensors [n, seq_len]."""
        if isinstance(index, Tensor):
            index = index.tolist()
        count = len(range(*index.indices(len(self)))) if isinstance(index, slice) else len(index)
        if count == 0:
            return RowTensors.from_arrays(np.empty((0, self.seq_len)), np.empty((0, self.seq_len)), np.empty(0), self.seq_len)
        if isinstance(index, range):
            index = list(index)
        cols = self.table[index]
        return RowTensors.from_arrays(cols["input_ids"], cols["target"], cols["length"], self.seq_len)

    def targets(self) -> np.ndarray:
        """Targets per row at positions 1.. (what the shifted loss sees), int64 [N]."""
        return np.asarray(self.table.with_format("arrow")["targets"]).astype(np.int64)

    @classmethod
    def from_tensors(cls, label: str, domain: str, input_ids: Tensor, labels: Tensor, attention_mask: Tensor) -> "SourceRows":
        """In-memory rows from tensors [N, seq_len] (tests, tools); attention must be a prefix of each row."""
        target = labels != IGNORE_INDEX
        length = attention_mask.sum(1).to(torch.int32)
        columns = {"input_ids": input_ids.to(torch.int64).numpy().astype(np.uint32), "target": target.numpy(),
                   "length": length.numpy(), "targets": target[:, 1:].sum(1).to(torch.int32).numpy()}
        digest = hashlib.sha256(b"".join(np.ascontiguousarray(c).tobytes() for c in columns.values())).hexdigest()[:20]
        table = datasets.Dataset.from_dict({k: list(v) for k, v in columns.items()}, features=rows_features(input_ids.shape[1]))
        return cls(label, domain, table, 0, digest)


def first_bad_json_line(files: list[str]) -> str | None:
    """'FILE line N: what is wrong' for the first line of a jsonl file that is not a JSON object."""
    for name in files:
        with open(name, encoding="utf-8", errors="replace") as fh:
            for number, line in enumerate(fh, start=1):
                if not line.strip():
                    continue
                try:
                    value = json.loads(line)
                except json.JSONDecodeError as exc:
                    return f"{name} line {number} is not valid JSON: {exc.msg.removesuffix(' at')} at column {exc.colno}"
                if not isinstance(value, dict):
                    return f"{name} line {number} is a JSON {type(value).__name__}, not an object"
    return None


def read_error(source: "DataSource", key: str, exc: Exception) -> UserError:
    """What is wrong with a source that `datasets` failed to read, in the recipe's words."""
    files = source_files(source.path) if source.type != "hub" else []
    if files and all(not Path(f).read_bytes().strip() for f in files):
        return UserError(f"{key}.path: {source.path} is empty; give a file with examples "
                         f"({'one JSON object per line' if source.type == 'jsonl' else 'text'})")
    bad_line = first_bad_json_line(files) if source.type == "jsonl" else None
    if bad_line:
        return UserError(f"{key}.path: {bad_line}; each line of a jsonl file must be one JSON object "
                         'such as {"text": "..."}')
    cause = exc.__cause__ or exc
    detail = str(cause).strip().splitlines()[0] if str(cause).strip() else type(cause).__name__
    return UserError(f"{key}.path: cannot read {source.path} as {source.type}: {detail}; "
                     f"check that the {'dataset' if source.type == 'hub' else 'file'} is valid {source.type}")


def load_source(source: "DataSource", streaming: bool = False) -> "datasets.Dataset | datasets.IterableDataset":
    """`datasets.load_dataset` for a source: the hub dataset, or the builder of its file type."""
    if source.type == "hub":
        return datasets.load_dataset(source.path, name=source.subset, split=source.split, revision=source.revision,
                                     streaming=streaming)
    kwargs: dict[str, Any] = {"sample_by": "document"} if source.type == "text" else {}
    return datasets.load_dataset(_BUILDERS[source.type], data_files=source_files(source.path), split="train",
                                 streaming=streaming, **kwargs)


def read_source(source: "DataSource", key: str) -> datasets.Dataset:
    """The raw examples of a source; `key` (e.g. `data.train[0]`) names it in errors."""
    try:
        ds = load_source(source)
    except Exception as exc:  # datasets wraps parse errors in several exception types
        raise read_error(source, key, exc) from None
    if source.field not in ds.column_names:
        raise UserError(f"{key}.field: {source.path} has no column {source.field!r}; "
                        f"its columns are: {', '.join(ds.column_names)}")
    if len(ds) == 0:
        raise UserError(f"{key}.path: {source.path} holds no examples; give a file with data")
    if source.max_examples:
        ds = ds.select(range(min(source.max_examples, len(ds))))
    return ds


def is_chat(source: "DataSource", ds: datasets.Dataset) -> bool:
    if source.format != "auto":
        return source.format == "chat"
    return isinstance(ds[0][source.field], list)


def chat_tokens(messages: list[dict[str, str]], tokenizer: PreTrainedTokenizerBase) -> tuple[list[int], list[int]]:
    """Token ids and labels of one conversation: only assistant turns are targets.

    The template is rendered for every prefix of the conversation; the tokens an assistant turn
    adds beyond the prefix rendered with the generation prompt are its targets. This works with
    any template that renders a conversation's prefix as a prefix of the whole.
    """
    ids = _render(tokenizer, messages, add_generation_prompt=False)
    labels = [IGNORE_INDEX] * len(ids)
    for i, message in enumerate(messages):
        if message.get("role") != "assistant":
            continue
        start = len(_render(tokenizer, messages[:i], add_generation_prompt=True)) if i else 0
        end_ids = _render(tokenizer, messages[: i + 1], add_generation_prompt=False)
        if ids[: len(end_ids)] != end_ids:
            raise UserError("chat template: rendering a conversation's prefix does not give a prefix of the whole; "
                            "this template cannot mark assistant tokens; use format: text")
        labels[start : len(end_ids)] = ids[start : len(end_ids)]
    return ids, labels


def _render(tokenizer: PreTrainedTokenizerBase, messages: list[dict], add_generation_prompt: bool) -> list[int]:
    if not messages:
        return []
    out = tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=add_generation_prompt)
    if isinstance(out, dict) or hasattr(out, "keys"):
        out = out["input_ids"]
    return list(out)


def check_messages(conversations: list[list[Any]], source: "DataSource", key: str, first: int = 0) -> None:
    """Every chat message must be {"role": str, "content": str}; name the first that is not
    (`first`: the index of conversations[0] in the source)."""
    for i, messages in enumerate(conversations, start=first):
        for j, message in enumerate(messages):
            missing = [k for k in ("role", "content") if not isinstance(message, dict) or not isinstance(message.get(k), str)]
            if missing:
                raise UserError(f"{key}.field: example {i + 1} of {source.path}, message {j + 1} has no text "
                                f"{' or '.join(repr(m) for m in missing)}; chat messages look like "
                                '{"role": "user", "content": "..."}')


@dataclass
class TokenizeBatch:
    """`datasets.map` function (batched, with indices): examples -> token ids per example.

    Text: {"ids"}; every token is a target and each example ends with EOS; blank texts are dropped.
    Chat: {"ids", "target"}; the chat template, only assistant tokens are targets."""

    source: DataSource
    key: str
    tokenizer: PreTrainedTokenizerBase
    chat: bool

    def __call__(self, batch: dict[str, list], indices: list[int]) -> dict[str, list]:
        source, key, values = self.source, self.key, batch[self.source.field]
        if self.chat:
            if not all(isinstance(v, list) for v in values):
                raise UserError(f"{key}.field: {source.field!r} must hold a list of messages in every example for chat data")
            check_messages(values, source, key, first=indices[0])
            pairs = [chat_tokens(v, self.tokenizer) for v in values]
            return {"ids": [p[0] for p in pairs], "target": [[t != IGNORE_INDEX for t in p[1]] for p in pairs]}
        bad = next((i for i, v in enumerate(values) if not isinstance(v, str)), None)
        if bad is not None:
            raise UserError(f"{key}.field: example {indices[bad] + 1} of {source.path} holds {type(values[bad]).__name__} in "
                            f"{source.field!r}, not text; every example needs text there (or set format: chat for messages)")
        texts = [v for v in values if v.strip()]
        eos = [self.tokenizer.eos_token_id] if self.tokenizer.eos_token_id is not None else []
        ids = [row + eos for row in self.tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"]] if texts else []
        return {"ids": ids}


class MixedStream:
    """A deterministic, weighted mix of several sources' rows.

    Global row r (counted over the whole run, all processes) comes from source s_r, drawn with
    probability proportional to the sources' weights by a seeded generator; within a source
    rows are taken in a seeded permutation that is redrawn at every pass (a streamed source: in
    its stream's order, streaming.py). The mapping is a pure function of (seed, r), so resuming at
    any step and sharding over processes need no state.
    """

    def __init__(self, sources: list[SourceRows], weights: list[float], seed: int, total_rows: int):
        self.sources = sources
        gen = torch.Generator().manual_seed(seed)
        probs = torch.tensor(weights, dtype=torch.float64)
        self.choice = torch.multinomial(probs / probs.sum(), total_rows, replacement=True, generator=gen)
        self.index = torch.empty(total_rows, dtype=torch.long)
        for s, rows in enumerate(sources):
            where = (self.choice == s).nonzero().squeeze(-1)
            if not isinstance(rows, SourceRows):  # a stream (streaming.StreamRows): its k-th draw is its row k
                self.index[where] = torch.arange(len(where))
                continue
            n = len(rows)
            passes = math.ceil(len(where) / n) if len(where) else 0
            perms = [torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + s * 7919 + p))
                     for p in range(passes)]
            if perms:
                self.index[where] = torch.cat(perms)[: len(where)]

    def rows(self, start: int, count: int) -> TokenBatch:
        """Global rows start .. start + count - 1 as one batch (one gather per source, not per row)."""
        choice, index = self.choice[start:start + count], self.index[start:start + count]
        seq_len = self.sources[0].seq_len
        fields = {f: torch.empty(len(choice), seq_len, dtype=torch.long) for f in ("input_ids", "attention_mask", "labels")}
        for s in choice.unique().tolist():
            where = (choice == s).nonzero().squeeze(-1)
            rows = self.sources[s].take(index[where])
            for name, out in fields.items():
                out[where] = getattr(rows, name)
        chosen = [self.sources[s] for s in choice.tolist()]
        return TokenBatch(**fields, domains=[s.domain for s in chosen], sources=[s.label for s in chosen],
                          row_index=index.tolist())


def steps_for_epochs(epochs: float, total_rows: int, global_batch_rows: int) -> int:
    return max(1, math.ceil(epochs * total_rows / global_batch_rows))
