"""Writing the cache: teacher forwards over every training row, top-k + tail + NLL + entropy,
one `datasets` Arrow folder per shard, written atomically (resume keeps complete shards).
Teachers come from the online teacher source, placed as in training; when some teacher has
another tokenizer, from the aligned source: every teacher's top-k is then stored in its own
vocabulary at the student's positions, with the span of its aligned token (-1: none).
With `cache.store: hidden` each teacher's final hidden states are stored instead (codec.py),
and its head weight once, in heads.safetensors."""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import pyarrow as pa
import torch
from rich.console import Console
from safetensors.torch import save_file
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from torch import Tensor, nn

from merge_distill import distributed as dist_mod
from merge_distill.cache import codec
from merge_distill.cache.manifest import (CACHE_FORMAT, CHECKSUM_FILE, HEADS_FILE, REWRITE_SHARD, collect_checksums,
                                            corrupt_shard, file_checksum, full_manifest, manifest_differences,
                                            read_manifest, resolve_store, shard_checksum, shard_folders)
from merge_distill.losses.fused import HeadLogits
from merge_distill.data import SourceRows
from merge_distill.errors import NonFiniteError, UserError
from merge_distill.models import load_student, load_tokenizer, logit_softcap, tokenizer_source
from merge_distill.plan import training_rows
from merge_distill.rundir import write_json_atomic
from merge_distill.schema import SELF_TEACHER, Recipe
from merge_distill.signals import TokenBatch, per_token_stats, tail_logmass
from merge_distill.sources import AlignedTeachers, OnlineTeachers


@dataclass
class CacheWriteResult:
    root: Path
    shards_written: int
    shards_kept: int  # complete shards found from an earlier (interrupted) call
    rows_written: int
    seconds: float


@torch.inference_mode()
def topk_targets(logits: Tensor, k: int, temperature: float, chunk_tokens: int) -> dict[str, Tensor]:
    """One teacher's logits (or log-probs) [B, T, V] -> ids [B, T, k] int32, values [B, T, k]
    float32 (top-k log-probs at `temperature`, largest first) and tail [B, T] (log of the mass
    outside the top k, at `temperature`). Log-probs at temperature 1 give the same result as the
    logits they came from: log_softmax removes the per-row constant either way."""
    B, T, V = logits.shape
    flat = logits.reshape(B * T, V)
    ids = torch.empty(B * T, k, dtype=torch.int32, device=logits.device)
    values = torch.empty(B * T, k, dtype=torch.float32, device=logits.device)
    tail = torch.empty(B * T, dtype=torch.float32, device=logits.device)
    for start in range(0, B * T, chunk_tokens):
        sl = slice(start, start + chunk_tokens)
        x = flat[sl].float() / temperature
        lse = torch.logsumexp(x, dim=-1)
        top_values, top_ids = x.topk(k, dim=-1)
        tail[sl] = tail_logmass(x, lse, top_values, top_ids)
        values[sl] = top_values - lse.unsqueeze(-1)
        ids[sl] = top_ids.to(torch.int32)
    return {"ids": ids.view(B, T, k), "values": values.view(B, T, k), "tail": tail.view(B, T)}


def teacher_targets(logits: Tensor, targets: Tensor, k: int, temperature: float, chunk_tokens: int) -> dict[str, Tensor]:
    """What the cache stores for one teacher: topk_targets plus nll / entropy [B, T] at
    temperature 1 (per_token_stats: exactly what the online path gives routers)."""
    nll, entropy, _ = per_token_stats(logits, targets, chunk_tokens, with_top1=False)
    return {**topk_targets(logits, k, temperature, chunk_tokens), "nll": nll, "entropy": entropy}


def _teacher_columns(teachers: OnlineTeachers | AlignedTeachers, batch: TokenBatch, recipe: Recipe,
                     store: str) -> list[dict[str, Tensor]]:
    """Per teacher, what the cache stores for a batch: ids [B, T, k] int32, values [B, T, k] float32,
    tail / nll / entropy [B, T] float32, and for aligned teachers span [B, T] int32 (the byte length
    of the teacher's next token, -1: not aligned); with store "hidden", hidden [B, T, H] and
    nll / entropy instead. Raises NonFiniteError naming the teacher."""
    section = recipe.cache
    assert section is not None
    if store == "hidden":
        signals = teachers.signals(batch)
        check_heads(signals.names, signals.logits)
        B, T = batch.targets.shape
        return [{"hidden": head.hidden.view(B, T, -1), "nll": signals.gold_nll[..., j].float(),  # type: ignore[union-attr]
                 "entropy": signals.entropy[..., j].float()} for j, head in enumerate(signals.logits)]
    if isinstance(teachers, AlignedTeachers):  # ids in each teacher's own vocabulary, at the student's positions
        return [{"ids": t.ids.to(torch.int32), "values": t.logprobs, "tail": t.tail, "nll": t.gold_nll,
                 "entropy": t.entropy, "span": t.span} for t in teachers.teacher_targets(batch, section.k)]
    signals = teachers.signals(batch)
    out = []
    for j, logits in enumerate(signals.logits):
        top = topk_targets(logits, section.k, recipe.loss.temperature, recipe.train.chunk_tokens)
        if not torch.isfinite(top["values"]).all():
            raise NonFiniteError(f"teacher {signals.names[j]!r} produced NaN/inf log-probabilities")
        out.append({**top, "nll": signals.gold_nll[..., j].float(), "entropy": signals.entropy[..., j].float()})
    return out


def check_heads(names: list[str], heads: list[Any]) -> None:
    """cache.store: hidden needs every teacher's head as hidden states + a plain linear weight
    (a HeadLogits from the teacher source, or the nn.Linear itself; None: neither)."""
    for name, head in zip(names, heads):
        if not isinstance(head, (HeadLogits, nn.Linear)):
            raise UserError(f"cache.store: hidden: teacher {name!r} has an output head that is not a plain linear layer "
                            "(or rescales what that layer gives, as Cohere's logit_scale does), so its logits cannot be "
                            "made from hidden states; set cache.store: topk")


def _save_heads(teachers: OnlineTeachers, root: Path) -> None:
    """heads.safetensors: each teacher's head weight [V, H] (the tokenizer's rows) as `t{j}`, and
    its soft-cap in the metadata, read from the loaded models (no forward). Written atomically (a
    temporary file, then a rename)."""
    heads = [model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
             for model in teachers.models]
    check_heads(teachers.names, [h if isinstance(h, nn.Linear) else None for h in heads])
    tensors = {f"t{j}": head.weight.detach()[: teachers.vocab_size].contiguous().cpu() for j, head in enumerate(heads)}
    caps = {f"t{j}_softcap": str(logit_softcap(model) or "") for j, model in enumerate(teachers.models)}
    partial = root / (HEADS_FILE + ".partial")
    save_file(tensors, str(partial), metadata=caps)
    partial.replace(root / HEADS_FILE)


def _encode_teacher(out: dict[str, Tensor], j: int, dtype: str, mass: float, bits: int) -> dict[str, Any]:
    """One teacher's columns for a batch of rows (codec.py): per row its kept ids and values as
    bytes, the kept counts when k is adaptive, and tail / NLL / entropy (/ span) [B, T]; or, for
    hidden states, per row their int8 bytes, and scale / NLL / entropy [B, T]."""
    if "hidden" in out:
        rows, scale = codec.encode_hidden(out["hidden"].cpu())
        return {f"t{j}_hidden": rows, f"t{j}_scale": scale, f"t{j}_nll": out["nll"].cpu().numpy(),
                f"t{j}_entropy": out["entropy"].cpu().numpy()}
    ids, values, tail = out["ids"].cpu(), out["values"].cpu().float(), out["tail"].cpu().float()
    B, T, k = values.shape
    if int(ids.max()) >= 1 << bits:
        raise ValueError(f"teacher {j}: token id {int(ids.max())} does not fit the cache's {bits}-bit ids")
    n = codec.kept_counts(values.reshape(B * T, k), mass).view(B, T)
    if mass < 1.0:
        tail = codec.kept_tail(values.reshape(B * T, k), tail.reshape(B * T), n.reshape(-1)).view(B, T)
    rows = [codec.encode_row(ids[b], values[b], n[b], dtype, bits) for b in range(B)]
    columns: dict[str, Any] = {f"t{j}_ids": [r[0] for r in rows], f"t{j}_values": [r[1] for r in rows],
                               f"t{j}_tail": tail.numpy()}
    if mass < 1.0:
        columns[f"t{j}_n"] = n.numpy().astype(codec.count_dtype(k))
    for field in ("nll", "entropy", "span"):
        if field in out:
            columns[f"t{j}_{field}"] = out[field].cpu().numpy()
    return columns


def _shard_table(columns: dict[str, Any]) -> Any:
    """numpy arrays [rows, ...] -> fixed-size list columns; lists of bytes (one per row) -> binary."""
    arrays = {}
    for name, array in columns.items():
        if isinstance(array, list):
            arrays[name] = pa.array(array, type=pa.binary())
            continue
        flat = pa.array(array.reshape(-1))
        arrays[name] = flat if array.ndim == 1 else pa.FixedSizeListArray.from_arrays(flat, int(np.prod(array.shape[1:])))
    return pa.table(arrays)


def _save_shard(columns: dict[str, Any], final: Path) -> None:
    """Write a shard as a `datasets` folder, atomically: into `<final>.partial`, then rename. Its
    checksum (shard_checksum) goes beside the data; the manifest collects it at the end."""
    partial = final.with_name(final.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    datasets.Dataset(datasets.table.InMemoryTable(_shard_table(columns))).save_to_disk(str(partial))
    (partial / CHECKSUM_FILE).write_text(shard_checksum(partial))
    partial.replace(final)


def _prepare_root(root: Path, manifest: dict[str, Any], overwrite: bool, is_main: bool) -> None:
    """Check cache.dir on every process (the same read-only decision everywhere, so a refusal
    never leaves a process waiting); only the main process deletes and writes."""
    cached = read_manifest(root)
    replace = False
    if cached is not None:
        problems = manifest_differences(cached, manifest, root, writing=True)
        if problems and not overwrite:
            raise UserError([*problems, f"cache.dir: {root} holds a cache for other settings; pass --overwrite to replace it"])
        replace = bool(problems)
    elif root.is_dir() and any(root.iterdir()):
        if not overwrite:
            raise UserError(f"cache.dir: {root} exists and is not a cache (no manifest.json); choose an empty or new "
                            "folder, or pass --overwrite to replace it")
        replace = True
    if is_main:
        if replace:
            shutil.rmtree(root)
        root.mkdir(parents=True, exist_ok=True)
        write_json_atomic(root / "manifest.json", manifest)


def _pending_shards(root: Path, rows: list[SourceRows], manifest: dict[str, Any]) -> tuple[list[tuple[SourceRows, int, Path]], int]:
    """(shards still to write, shards kept from an earlier call), in a fixed order."""
    todo, kept = [], 0
    for source_rows, entry in zip(rows, manifest["sources"]):
        folder = root / "sources" / entry["folder"]
        for shard in range(entry["shards"]):
            final = folder / f"shard-{shard:05d}"
            if final.is_dir():
                kept += 1
            else:
                todo.append((source_rows, shard, final))
    return todo, kept


def write_cache(recipe: Recipe, console: Console | None = None, overwrite: bool = False,
                show_progress: bool = True) -> CacheWriteResult:
    """Run the recipe's teachers over all its training rows and store their top-k targets.

    Data-parallel over the launch's processes, teachers placed as in training (ZeRO-3 sharded
    under DeepSpeed): the pending shards are dealt round-robin, each process writes its own
    (disjoint) shards, and the main process writes the one manifest. Resumable: complete
    shards of an earlier call with the same manifest are kept. Raises UserError when cache.dir
    holds a different cache (or something else) and not `overwrite`.
    """
    section = recipe.cache
    if section is None:
        raise UserError("cache: the recipe has no cache section; add one, e.g. cache: {dir: cache/teachers, k: 64}")
    console = console or Console()
    started = time.perf_counter()
    tokenizer = load_tokenizer(*tokenizer_source(recipe))
    vocab_size = len(tokenizer)
    if section.k > vocab_size:
        raise UserError(f"cache.k is {section.k} but the vocabulary has {vocab_size} tokens; use at most {vocab_size}")
    rows = training_rows(recipe, tokenizer)
    manifest = full_manifest(recipe, tokenizer, rows)
    id_bits = []
    for t in recipe.teachers:
        size = vocab_size
        if t.name in manifest["aligned"] and t.model != SELF_TEACHER:
            size = len(load_tokenizer(t.model, t.revision, t.trust_remote_code))
            if section.k > size:
                raise UserError(f"cache.k is {section.k} but teacher {t.name!r} has {size} tokens in its own vocabulary, "
                                f"where its top-k is stored; use at most {size}")
        id_bits.append(codec.id_bits(size))
    manifest["id_bits"] = id_bits
    root = Path(section.dir)
    accelerator = dist_mod.accelerator_for(recipe)
    sharded = dist_mod.uses_deepspeed(accelerator) and recipe.distributed.teacher_zero_stage == 3
    store, manifest["hidden_sizes"] = resolve_store(recipe, manifest, sharded)
    manifest["store"] = store
    world, rank = accelerator.num_processes, accelerator.process_index
    is_main = rank == 0
    _prepare_root(root, manifest, overwrite, is_main)
    accelerator.wait_for_everyone()
    todo, kept = _pending_shards(root, rows, manifest)
    # the heads are (re)written whenever they are not known good: a first call, or a damaged file
    heads_needed = store == "hidden" and corrupt_shard(root, read_manifest(root) or {}, HEADS_FILE) is not None
    accelerator.wait_for_everyone()  # every process has listed the shards before any is written
    mine = todo[rank::world]
    per_shard, batch_rows = section.rows_per_shard, recipe.train.micro_batch_size
    batches = [(shard_index, slice(b, min(stop, b + batch_rows)))
               for shard_index, (source_rows, shard, _) in enumerate(mine)
               for stop in [min(len(source_rows), (shard + 1) * per_shard)]
               for b in range(shard * per_shard, stop, batch_rows)]
    rounds = dist_mod.global_max(accelerator, max(len(batches), int(heads_needed)))  # collective under ZeRO-3
    teachers: OnlineTeachers | AlignedTeachers | None = None
    if rounds:
        student = load_student(recipe) if any(t.model == SELF_TEACHER for t in recipe.teachers) else None
        teachers = (AlignedTeachers.open(recipe, accelerator, tokenizer, student) if manifest["aligned"]
                    else OnlineTeachers.open(recipe, accelerator, vocab_size, student))
        if store == "hidden":
            teachers.fused_heads = True  # type: ignore[union-attr]  # hidden states + head, never [B, T, V]
    device = accelerator.device
    my_rows = sum(sl.stop - sl.start for _, sl in batches)
    columns_bar = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("rows"),
                   TimeElapsedColumn(), TimeRemainingColumn()]
    written = 0
    with Progress(*columns_bar, console=console, disable=not (show_progress and is_main)) as progress:
        what = "hidden states" if store == "hidden" else f"top-{section.k}"
        task = progress.add_task(f"caching {len(recipe.teachers)} teachers ({what}, process {rank + 1} of {world})",
                                 total=my_rows)
        parts: dict[str, list[np.ndarray]] = {}
        for i in range(rounds):
            shard_index, sl = batches[min(i, len(batches) - 1)] if batches else (-1, slice(0, min(batch_rows, len(rows[0]))))
            source_rows = mine[shard_index][0] if batches else rows[0]
            taken = source_rows.take(sl)
            batch = TokenBatch(taken.input_ids.to(device), taken.attention_mask.to(device), taken.labels.to(device), [], [])
            if heads_needed and i == 0 and is_main:
                _save_heads(teachers, root)  # type: ignore[arg-type]
            try:
                stored = _teacher_columns(teachers, batch, recipe, store)  # type: ignore[arg-type]
            except NonFiniteError as exc:
                raise NonFiniteError(f"{exc} on rows {sl.start}..{sl.stop - 1} of {source_rows.label}") from None
            if i >= len(batches):
                continue  # a repeated batch only keeps the collectives in step
            for j, out in enumerate(stored):
                for name, column in _encode_teacher(out, j, section.dtype, section.mass, id_bits[j]).items():
                    parts.setdefault(name, []).append(column)
            progress.advance(task, sl.stop - sl.start)
            last_of_shard = i + 1 == len(batches) or batches[i + 1][0] != shard_index
            if last_of_shard:
                _, shard, final = mine[shard_index]
                start = shard * per_shard
                columns = {"row": np.arange(start, sl.stop, dtype=np.int64)}
                columns.update({name: (sum(chunks, []) if isinstance(chunks[0], list) else np.concatenate(chunks))
                                for name, chunks in parts.items()})
                final.parent.mkdir(parents=True, exist_ok=True)
                _save_shard(columns, final)
                written += sl.stop - start
                parts = {}
    accelerator.wait_for_everyone()
    written = int(dist_mod.global_sum(accelerator, written))
    if is_main:
        manifest["checksums"], stored_bytes = collect_checksums(root, manifest)
        if store == "hidden":  # paid once per cache, not per token: recorded beside the per-token figure
            manifest["checksums"][HEADS_FILE] = file_checksum(root / HEADS_FILE)
            manifest["heads_bytes"] = (root / HEADS_FILE).stat().st_size
        total_tokens = sum(s["rows"] for s in manifest["sources"]) * manifest["seq_len"] * len(manifest["teachers"])
        manifest["bytes_per_token_per_teacher"] = round(stored_bytes / max(total_tokens, 1), 2)
        manifest["complete"] = True
        write_json_atomic(root / "manifest.json", manifest)
    accelerator.wait_for_everyone()
    return CacheWriteResult(root, len(todo), kept, written, time.perf_counter() - started)


def verify_cache(root: Path) -> int:
    """Check a cache: a complete manifest of this format, every shard present with the checksum the
    manifest records. Returns the shards checked; raises UserError listing every bad shard."""
    manifest = read_manifest(root)
    if manifest is None:
        raise UserError(f"cache.dir: {root} holds no cache (no manifest.json); write it with `merge-distill cache RECIPE`")
    if manifest.get("format") != CACHE_FORMAT:
        raise UserError(f"cache.dir: {root} was written by another version of merge_distill (format {manifest.get('format')}, "
                        f"this one reads {CACHE_FORMAT}); rewrite it with `merge-distill cache RECIPE --overwrite`")
    if not manifest.get("complete"):
        raise UserError(f"cache.dir: the cache in {root} is incomplete; finish it with `merge-distill cache RECIPE` "
                        "(it resumes where it stopped)")
    names = [name for name, _ in shard_folders(root, manifest)] + ([HEADS_FILE] if manifest.get("store") == "hidden" else [])
    problems = [p for p in (corrupt_shard(root, manifest, name) for name in names) if p]
    if problems:
        raise UserError([*problems, f"for each: {REWRITE_SHARD}"])
    return len(names)
