"""Data: sources -> tokenized rows of seq_len -> a seeded, weighted mix of TokenBatches.

`datasets` does all reading (text, jsonl, parquet, hub). Text examples are targets on every
token; chat examples go through the tokenizer's chat template and only assistant tokens are
targets (others -100). Each row keeps its source's domain tag through to the batch.
"""

from __future__ import annotations

import glob
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets
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



@dataclass
class SourceRows:
    """All rows of one source: input_ids, labels, attention_mask, each [N, seq_len] long."""

    label: str
    domain: str
    input_ids: Tensor
    labels: Tensor
    attention_mask: Tensor

    def __len__(self) -> int:
        return self.input_ids.shape[0]


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


def read_source(source: "DataSource", key: str) -> datasets.Dataset:
    """The raw examples of a source; `key` (e.g. `data.train[0]`) names it in errors."""
    files = source_files(source.path) if source.type != "hub" else []
    try:
        if source.type == "hub":
            ds = datasets.load_dataset(source.path, name=source.subset, split=source.split, revision=source.revision)
        else:
            kwargs: dict[str, Any] = {"sample_by": "document"} if source.type == "text" else {}
            ds = datasets.load_dataset(_BUILDERS[source.type], data_files=files, split="train", **kwargs)
    except Exception as exc:  # datasets wraps parse errors in several exception types
        if files and all(not Path(f).read_bytes().strip() for f in files):
            raise UserError(f"{key}.path: {source.path} is empty; give a file with examples "
                            f"({'one JSON object per line' if source.type == 'jsonl' else 'text'})") from None
        bad_line = first_bad_json_line(files) if source.type == "jsonl" else None
        if bad_line:
            raise UserError(f"{key}.path: {bad_line}; each line of a jsonl file must be one JSON object "
                            'such as {"text": "..."}') from None
        cause = exc.__cause__ or exc
        detail = str(cause).strip().splitlines()[0] if str(cause).strip() else type(cause).__name__
        raise UserError(f"{key}.path: cannot read {source.path} as {source.type}: {detail}; "
                        f"check that the file is valid {source.type}") from None
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


def check_messages(conversations: list[list[Any]], source: "DataSource", key: str) -> None:
    """Every chat message must be {"role": str, "content": str}; name the first that is not."""
    for i, messages in enumerate(conversations):
        for j, message in enumerate(messages):
            missing = [k for k in ("role", "content") if not isinstance(message, dict) or not isinstance(message.get(k), str)]
            if missing:
                raise UserError(f"{key}.field: example {i + 1} of {source.path}, message {j + 1} has no text "
                                f"{' or '.join(repr(m) for m in missing)}; chat messages look like "
                                '{"role": "user", "content": "..."}')


def tokenize_source(source: "DataSource", key: str, tokenizer: PreTrainedTokenizerBase) -> tuple[list[list[int]], list[list[int]]]:
    """(ids, labels) per example."""
    ds = read_source(source, key)
    values = ds[source.field]
    if is_chat(source, ds):
        if not getattr(tokenizer, "chat_template", None):
            raise UserError(f"{key}: chat data needs a tokenizer with a chat template; this tokenizer has none")
        if not all(isinstance(v, list) for v in values):
            raise UserError(f"{key}.field: {source.field!r} must hold a list of messages in every example for chat data")
        check_messages(values, source, key)
        pairs = [chat_tokens(v, tokenizer) for v in values]
        return [p[0] for p in pairs], [p[1] for p in pairs]
    bad = next((i for i, v in enumerate(values) if not isinstance(v, str)), None)
    if bad is not None:
        raise UserError(f"{key}.field: example {bad + 1} of {source.path} holds {type(values[bad]).__name__} in "
                        f"{source.field!r}, not text; every example needs text there (or set format: chat for messages)")
    texts = [v for v in values if v.strip()]
    if not texts:
        raise UserError(f"{key}.path: {source.path} holds only empty text; give a file with text")
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    ids = [row + eos for row in tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"]]
    return ids, [list(r) for r in ids]


def build_rows(source: "DataSource", key: str, tokenizer: PreTrainedTokenizerBase, seq_len: int, packing: bool) -> SourceRows:
    ids, labels = tokenize_source(source, key, tokenizer)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    if packing:
        flat_ids = [t for row in ids for t in row]
        flat_labels = [t for row in labels for t in row]
        n_rows = max(1, len(flat_ids) // seq_len)
        chunks = [(flat_ids[i * seq_len:(i + 1) * seq_len], flat_labels[i * seq_len:(i + 1) * seq_len]) for i in range(n_rows)]
    else:
        chunks = [(i[:seq_len], l[:seq_len]) for i, l in zip(ids, labels)]
    input_ids = torch.full((len(chunks), seq_len), pad_id, dtype=torch.long)
    label_rows = torch.full((len(chunks), seq_len), IGNORE_INDEX, dtype=torch.long)
    attention = torch.zeros((len(chunks), seq_len), dtype=torch.long)
    for r, (row_ids, row_labels) in enumerate(chunks):
        input_ids[r, : len(row_ids)] = torch.tensor(row_ids, dtype=torch.long)
        label_rows[r, : len(row_labels)] = torch.tensor(row_labels, dtype=torch.long)
        attention[r, : len(row_ids)] = 1
    if int((label_rows[:, 1:] != IGNORE_INDEX).sum()) == 0:
        if any(t != IGNORE_INDEX for row in labels for t in row):
            raise UserError(f"{key}: {source.path} gives no training target at seq_len {seq_len}; "
                            "give longer examples or a larger data.seq_len")
        raise UserError(f"{key}: no example of {source.path} has an assistant turn, and chat data trains only on "
                        "assistant replies; add assistant messages or set format: text")
    return SourceRows(source.label, source.domain, input_ids, label_rows, attention)


class MixedStream:
    """A deterministic, weighted mix of several sources' rows.

    Global row r (counted over the whole run, all processes) comes from source s_r, drawn with
    probability proportional to the sources' weights by a seeded generator; within a source
    rows are taken in a seeded permutation that is redrawn at every pass. The mapping is a pure
    function of (seed, r), so resuming at any step and sharding over processes need no state.
    """

    def __init__(self, sources: list[SourceRows], weights: list[float], seed: int, total_rows: int):
        self.sources = sources
        gen = torch.Generator().manual_seed(seed)
        probs = torch.tensor(weights, dtype=torch.float64)
        self.choice = torch.multinomial(probs / probs.sum(), total_rows, replacement=True, generator=gen)
        self.index = torch.empty(total_rows, dtype=torch.long)
        for s, rows in enumerate(sources):
            where = (self.choice == s).nonzero().squeeze(-1)
            n = len(rows)
            passes = math.ceil(len(where) / n) if len(where) else 0
            perms = [torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + s * 7919 + p))
                     for p in range(passes)]
            if perms:
                self.index[where] = torch.cat(perms)[: len(where)]

    def rows(self, start: int, count: int) -> TokenBatch:
        """Global rows start .. start + count - 1 as one batch (one gather per source, not per row)."""
        choice, index = self.choice[start:start + count], self.index[start:start + count]
        seq_len = self.sources[0].input_ids.shape[1]
        fields = {f: torch.empty(len(choice), seq_len, dtype=torch.long) for f in ("input_ids", "attention_mask", "labels")}
        for s in choice.unique().tolist():
            where = (choice == s).nonzero().squeeze(-1)
            for name, out in fields.items():
                out[where] = getattr(self.sources[s], name)[index[where]]
        chosen = [self.sources[s] for s in choice.tolist()]
        return TokenBatch(**fields, domains=[s.domain for s in chosen], sources=[s.label for s in chosen],
                          row_index=index.tolist())


def steps_for_epochs(epochs: float, total_rows: int, global_batch_rows: int) -> int:
    return max(1, math.ceil(epochs * total_rows / global_batch_rows))
