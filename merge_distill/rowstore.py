"""Tokenized rows as a memory-mapped Arrow artifact, built once per (data, tokenizer, seq_len, packing).

`build_rows(source, key, tokenizer, seq_len, packing, store)` returns a source's rows:

1. Its fingerprint covers the source's reading settings, its files' contents (or the hub
   dataset's own fingerprint), the tokenizer's definition, seq_len, packing and ROWS_FORMAT.
2. STORE/<fingerprint>/ only ever appears by an atomic rename of a finished build, so when it
   exists it is complete: it is memory-mapped (no tokenizing, a second start takes seconds).
3. Otherwise one process builds it under a file lock while any other process that needs the
   same rows waits on the lock, then maps the finished folder. The build tokenizes with
   `datasets.map` (batched, fast tokenizer, `num_proc` workers), then packs the tokens into rows
   of seq_len a record batch at a time (read from the tokenized files with plain reads) and
   writes rows.arrow into STORE/<fingerprint>.partial-<pid>/. Memory is bounded by a batch, not
   by the corpus. A killed build leaves only a `.partial-*` folder,
   which nothing reads and the next build removes.

rows.arrow columns, one row per training row: input_ids uint32[seq_len] (padding: the pad id),
target bool[seq_len] (the token is a training target; labels are ids there and -100
elsewhere), length int32 (tokens before padding) and targets int32 (targets at positions
1..seq_len-1, what the shifted loss sees).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from datasets.arrow_writer import ArrowWriter
from filelock import FileLock
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from transformers import PreTrainedTokenizerBase

from merge_distill.data import SourceRows, TokenizeBatch, is_chat, read_source, rows_features, source_files
from merge_distill.errors import UserError
from merge_distill.schema import DataSection, DataSource

ROWS_FORMAT = 2  # 2: the rows digest no longer depends on how the build batched them
ROWS_FILE, META_FILE = "rows.arrow", "meta.json"
# Examples per tokenizer call: the fast tokenizer keeps offsets and more per token for a whole
# call (about 35 bytes per token: 1000 examples of 25 kB took 1.1 GiB), so calls stay small.
MAP_BATCH = 128
WHOLE_FILE_HASH_BYTES = 256 << 20  # files up to this size are hashed whole; larger ones by size, mtime and samples
# Text examples are targets on every token, so only chat examples store a target mask.
TEXT_TOKENS = datasets.Features({"ids": datasets.Sequence(datasets.Value("uint32"))})
CHAT_TOKENS = datasets.Features({"ids": datasets.Sequence(datasets.Value("uint32")),
                                 "target": datasets.Sequence(datasets.Value("bool"))})


def store_dir(data: DataSection) -> Path:
    """data.tokenized_dir, else $MERGE_DISTILL_CACHE/tokenized, else ~/.cache/merge_distill/tokenized."""
    if data.tokenized_dir:
        return Path(data.tokenized_dir)
    root = os.environ.get("MERGE_DISTILL_CACHE") or Path.home() / ".cache" / "merge_distill"
    return Path(root) / "tokenized"


# ---- fingerprints ----------------------------------------------------------------------------


def _file_digest(path: str, h: "hashlib._Hash") -> None:
    """A file's contents; beyond WHOLE_FILE_HASH_BYTES its size, mtime and 1 MiB at start, middle
    and end (hashing a terabyte corpus at every start would cost minutes)."""
    stat = os.stat(path)
    h.update(f"{path}\0{stat.st_size}\0".encode())
    with open(path, "rb") as fh:
        if stat.st_size <= WHOLE_FILE_HASH_BYTES:
            for block in iter(lambda: fh.read(1 << 22), b""):
                h.update(block)
            return
        h.update(str(stat.st_mtime_ns).encode())
        for at in (0, stat.st_size // 2, stat.st_size - (1 << 20)):
            fh.seek(at)
            h.update(fh.read(1 << 20))


def tokenizer_digest(tokenizer: PreTrainedTokenizerBase) -> str:
    """What decides a tokenizer's ids: its full definition (fast tokenizers), else its vocabulary,
    plus the chat template and the special ids the rows use."""
    h = hashlib.sha256()
    backend = getattr(tokenizer, "backend_tokenizer", None)
    h.update(backend.to_str().encode() if backend is not None else json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    h.update(json.dumps([type(tokenizer).__name__, len(tokenizer), tokenizer.eos_token_id, tokenizer.pad_token_id,
                         getattr(tokenizer, "chat_template", None)]).encode())
    return h.hexdigest()


def rows_fingerprint(source: DataSource, tokenizer: PreTrainedTokenizerBase, seq_len: int, packing: bool,
                     hub_fingerprint: str | None = None) -> str:
    h = hashlib.sha256()
    settings = source.model_dump(include={"type", "path", "subset", "split", "revision", "field", "format", "max_examples"})
    h.update(json.dumps([ROWS_FORMAT, settings, seq_len, packing, hub_fingerprint], sort_keys=True).encode())
    for name in (source_files(source.path) if source.type != "hub" else []):
        _file_digest(name, h)
    h.update(tokenizer_digest(tokenizer).encode())
    return h.hexdigest()[:24]


# ---- building ----------------------------------------------------------------------------------


def _blocks(tokens: datasets.Dataset) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """(ids uint32 [n_tokens], target bool [n_tokens], offsets int64 [n_examples + 1]) per record
    batch of the tokenized files, in order. The files are read with plain reads, one batch at a
    time, not memory-mapped: every page of a memory map that is read stays in this process's
    resident set until the map is closed, so the packer's RSS would grow with the corpus."""
    for name in [f["filename"] for f in tokens.cache_files]:
        with pa.OSFile(name) as fh:
            for batch in pa.ipc.open_stream(fh):
                ids = batch.column("ids")
                lengths = pc.list_value_length(ids).to_numpy(zero_copy_only=False).astype(np.int64)
                offsets = np.concatenate([[0], np.cumsum(lengths)])
                flat = ids.flatten().to_numpy(zero_copy_only=False).astype(np.uint32, copy=False)
                target = (batch.column("target").flatten().to_numpy(zero_copy_only=False).astype(bool, copy=False)
                          if "target" in batch.schema.names else np.ones(len(flat), bool))
                yield flat, target, offsets


def pack(blocks: Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]], seq_len: int, packing: bool, pad_id: int
         ) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray, int]]:
    """Blocks of tokenized examples (ids uint32 [n_tokens], target bool [n_tokens], offsets int64
    [n_examples + 1]) -> rows (ids [n, L] uint32, target [n, L] bool, length [n] int32, examples consumed).

    packing: all examples concatenated and cut into rows of seq_len; the tail shorter than a
    row is dropped, except when it is the only row (then it is padded). Else each example is
    one row, truncated or padded to seq_len."""
    carry_ids, carry_target = np.empty(0, np.uint32), np.empty(0, bool)
    emitted = 0
    for ids, target, offsets in blocks:
        examples = len(offsets) - 1
        if packing:
            ids, target = np.concatenate([carry_ids, ids]), np.concatenate([carry_target, target])
            n = len(ids) // seq_len
            carry_ids, carry_target = ids[n * seq_len:], target[n * seq_len:]
            emitted += n
            yield (ids[: n * seq_len].reshape(n, seq_len), target[: n * seq_len].reshape(n, seq_len),
                   np.full(n, seq_len, np.int32), examples)
            continue
        length = np.minimum(np.diff(offsets), seq_len).astype(np.int32)
        pos = np.arange(seq_len)
        inside = pos[None, :] < length[:, None]
        where = np.minimum(offsets[:-1, None] + pos[None, :], max(len(ids) - 1, 0))
        yield (np.where(inside, ids[where] if len(ids) else pad_id, pad_id).astype(np.uint32),
               inside & (target[where] if len(ids) else False), length, examples)
    if packing and emitted == 0 and len(carry_ids):
        n = len(carry_ids)
        row_ids = np.full((1, seq_len), pad_id, np.uint32)
        row_target = np.zeros((1, seq_len), bool)
        row_ids[0, :n], row_target[0, :n] = carry_ids, carry_target
        yield row_ids, row_target, np.array([n], np.int32), 0


def row_pad_id(tokenizer: PreTrainedTokenizerBase) -> int:
    """The id that pads rows: the pad token, else EOS, else 0."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)


def _auto_procs(n_examples: int, num_proc: int | None) -> int:
    if num_proc:
        return num_proc
    return max(1, min(os.cpu_count() or 1, 8, n_examples // 4096))


def _tokenize(raw: datasets.Dataset, source: DataSource, key: str, tokenizer: PreTrainedTokenizerBase,
              work: Path, num_proc: int | None, fingerprint: str) -> datasets.Dataset:
    chat = is_chat(source, raw)
    if chat and not getattr(tokenizer, "chat_template", None):
        raise UserError(f"{key}: chat data needs a tokenizer with a chat template; this tokenizer has none")
    procs = _auto_procs(len(raw), num_proc)
    if procs > 1:
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # the workers are the parallelism
    shown = Console(stderr=True).is_terminal
    if shown:
        datasets.enable_progress_bars()
    try:
        return raw.map(TokenizeBatch(source, key, tokenizer, chat), batched=True, with_indices=True, batch_size=MAP_BATCH,
                       writer_batch_size=MAP_BATCH, remove_columns=raw.column_names,
                       features=CHAT_TOKENS if chat else TEXT_TOKENS, num_proc=procs if procs > 1 else None,
                       cache_file_name=str(work / "tokens.arrow"), new_fingerprint=fingerprint + "-tokens",
                       load_from_cache_file=False, desc=f"tokenizing {key}")
    finally:
        if shown:
            datasets.disable_progress_bars()


def _build(source: DataSource, key: str, tokenizer: PreTrainedTokenizerBase, seq_len: int, packing: bool,
           raw: datasets.Dataset, fingerprint: str, final: Path, num_proc: int | None) -> None:
    work = final.with_name(f"{final.name}.partial-{os.getpid()}")
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    started = time.perf_counter()
    try:
        tokens = _tokenize(raw, source, key, tokenizer, work, num_proc, fingerprint)
        if len(tokens) == 0:
            raise UserError(f"{key}.path: {source.path} holds only empty text; give a file with text")
        pad_id = row_pad_id(tokenizer)
        # one running hash per column: the digest depends on the rows, not on the batches they came in
        column_hashes = [hashlib.sha256() for _ in range(3)]
        counts = {"rows": 0, "tokens": 0, "targets": 0, "any_target": False}
        console = Console(stderr=True)
        columns = [TextColumn(f"packing {key}"), BarColumn(), MofNCompleteColumn(), TextColumn("examples"),
                   TextColumn("{task.fields[rate]}"), TimeElapsedColumn()]
        writer = ArrowWriter(features=rows_features(seq_len), path=str(work / ROWS_FILE))
        with Progress(*columns, console=console, disable=not console.is_terminal) as progress:
            task = progress.add_task("pack", total=len(tokens), rate="")
            for ids, target, length, examples in pack(_blocks(tokens), seq_len, packing, pad_id):
                counts["any_target"] |= bool(target.any())
                shifted = target[:, 1:].sum(1).astype(np.int32)
                counts["rows"] += len(ids)
                counts["tokens"] += int(length.sum())
                counts["targets"] += int(shifted.sum())
                for h, part in zip(column_hashes, (ids, target, length)):
                    h.update(np.ascontiguousarray(part).tobytes())
                writer.write_table(pa.table({
                    "input_ids": pa.FixedSizeListArray.from_arrays(pa.array(ids.reshape(-1)), seq_len),
                    "target": pa.FixedSizeListArray.from_arrays(pa.array(target.reshape(-1)), seq_len),
                    "length": pa.array(length), "targets": pa.array(shifted)}))
                rate = counts["tokens"] / max(time.perf_counter() - started, 1e-9)
                progress.update(task, advance=examples, rate=f"{rate:,.0f} tokens/s")
        writer.finalize()
        writer.close()
        del tokens
        for leftover in work.glob("tokens*.arrow"):
            leftover.unlink()
        meta = {"format": ROWS_FORMAT, "fingerprint": fingerprint, "source": source.path, "seq_len": seq_len,
                "packing": packing, "pad_id": pad_id, "digest": hashlib.sha256(b"".join(h.digest() for h in column_hashes)).hexdigest()[:20],
                "seconds": round(time.perf_counter() - started, 3), **counts}
        (work / META_FILE).write_text(json.dumps(meta, indent=1))
        os.replace(work, final)  # the one step that makes the rows visible: atomic
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _remove_stale(store: Path, fingerprint: str) -> None:
    """Partial folders of builds that died (we hold the lock, so none is still running)."""
    for stale in store.glob(f"{fingerprint}.partial-*"):
        shutil.rmtree(stale, ignore_errors=True)


def build_rows(source: DataSource, key: str, tokenizer: PreTrainedTokenizerBase, seq_len: int, packing: bool,
               store: Path, num_proc: int | None = None) -> SourceRows:
    """The source's rows, memory-mapped from STORE (built there first when missing); `key`
    (e.g. `data.train[0]`) names the source in errors."""
    raw = read_source(source, key) if source.type == "hub" else None
    hub_fingerprint = getattr(raw, "_fingerprint", None) if raw is not None else None
    fingerprint = rows_fingerprint(source, tokenizer, seq_len, packing, hub_fingerprint)
    final = store / fingerprint
    if not (final / META_FILE).is_file():
        try:
            store.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise UserError(f"data.tokenized_dir: cannot create {store}: {exc.strerror}; "
                            "point data.tokenized_dir (or $MERGE_DISTILL_CACHE) at a writable folder") from None
        with FileLock(str(store / f"{fingerprint}.lock")):
            if not (final / META_FILE).is_file():  # another process may have built it while we waited
                _remove_stale(store, fingerprint)
                _build(source, key, tokenizer, seq_len, packing, raw if raw is not None else read_source(source, key),
                       fingerprint, final, num_proc)
    return open_rows(final, source, key)


def open_rows(folder: Path, source: DataSource, key: str) -> SourceRows:
    """Memory-map a finished build; raise the data errors its counts show."""
    meta = json.loads((folder / META_FILE).read_text())
    if meta["targets"] == 0:
        if meta["any_target"]:
            raise UserError(f"{key}: {source.path} gives no training target at seq_len {meta['seq_len']}; "
                            "give longer examples or a larger data.seq_len")
        raise UserError(f"{key}: no example of {source.path} has an assistant turn, and chat data trains only on "
                        "assistant replies; add assistant messages or set format: text")
    table = datasets.Dataset.from_file(str(folder / ROWS_FILE))
    return SourceRows(source.label, source.domain, table, int(meta["pad_id"]), meta["digest"])
