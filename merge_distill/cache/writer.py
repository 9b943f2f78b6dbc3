"""Writing the cache: teacher forwards over every training row, top-k + tail + NLL + entropy,
one `datasets` Arrow folder per shard, written atomically (resume keeps complete shards)."""

from __future__ import annotations

import math
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor

from merge_distill.cache.manifest import VALUE_DTYPES, full_manifest, manifest_differences, read_manifest
from merge_distill.errors import UserError
from merge_distill.signals import IGNORE_INDEX, per_token_stats

if TYPE_CHECKING:
    from rich.console import Console

    from merge_distill.recipe import Recipe


@dataclass
class CacheWriteResult:
    root: Path
    shards_written: int
    shards_kept: int  # complete shards found from an earlier (interrupted) call
    rows_written: int
    seconds: float


@torch.inference_mode()
def teacher_targets(logits: Tensor, targets: Tensor, k: int, temperature: float, chunk_tokens: int) -> dict[str, Tensor]:
    """One teacher's logits [B, T, V] -> what the cache stores for it: ids [B, T, k] int32 and
    values [B, T, k] float32 (top-k log-probs at `temperature`, largest first), tail [B, T]
    (log of the mass outside the top k, at `temperature`), nll / entropy [B, T] at temperature 1
    (per_token_stats: exactly what the online path gives routers)."""
    B, T, V = logits.shape
    nll, entropy, _ = per_token_stats(logits, targets, chunk_tokens, with_top1=False)
    flat = logits.reshape(B * T, V)
    ids = torch.empty(B * T, k, dtype=torch.int32, device=logits.device)
    values = torch.empty(B * T, k, dtype=torch.float32, device=logits.device)
    tail = torch.empty(B * T, dtype=torch.float32, device=logits.device)
    for start in range(0, B * T, chunk_tokens):
        sl = slice(start, start + chunk_tokens)
        x = flat[sl].float() / temperature
        lse = torch.logsumexp(x, dim=-1, keepdim=True)
        top_values, top_ids = x.topk(k, dim=-1)
        # The tail exactly: logsumexp over the tokens outside the top k (never 1 - sum, which
        # cancels catastrophically when the top k hold nearly all the mass).
        tail[sl] = (torch.logsumexp(x.scatter_(-1, top_ids, -math.inf), dim=-1, keepdim=True) - lse).squeeze(-1)
        values[sl] = top_values - lse
        ids[sl] = top_ids.to(torch.int32)
    return {"ids": ids.view(B, T, k), "values": values.view(B, T, k), "tail": tail.view(B, T), "nll": nll, "entropy": entropy}


def _to_storage(values: Tensor, dtype: str) -> np.ndarray:
    """float32 log-probs -> numpy in the storage dtype (16-bit kinds as int16 bit patterns)."""
    stored = values.to(VALUE_DTYPES[dtype]).cpu()
    return (stored if dtype == "float32" else stored.view(torch.int16)).numpy()


def _shard_table(columns: dict[str, np.ndarray]) -> Any:
    import pyarrow as pa

    arrays = {}
    for name, array in columns.items():
        flat = pa.array(array.reshape(-1))
        arrays[name] = flat if array.ndim == 1 else pa.FixedSizeListArray.from_arrays(flat, int(np.prod(array.shape[1:])))
    return pa.table(arrays)


def _save_shard(columns: dict[str, np.ndarray], final: Path) -> None:
    """Write a shard as a `datasets` folder, atomically: into `<final>.partial`, then rename."""
    import datasets

    partial = final.with_name(final.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    datasets.Dataset(datasets.table.InMemoryTable(_shard_table(columns))).save_to_disk(str(partial))
    partial.replace(final)


def _load_teachers(recipe: "Recipe", device: torch.device) -> list[Any]:
    from merge_distill.models import load_student, load_teachers
    from merge_distill.recipe import SELF_TEACHER

    student = load_student(recipe) if any(spec.model == SELF_TEACHER for spec in recipe.teachers) else None
    return [m.to(device) for m in load_teachers(recipe, student)]


def write_cache(recipe: "Recipe", console: "Console | None" = None, overwrite: bool = False,
                show_progress: bool = True) -> CacheWriteResult:
    """Run the recipe's teachers over all its training rows and store their top-k targets.

    Resumable: complete shards of an earlier call with the same manifest are kept. Raises
    UserError when cache.dir holds a different cache (or something else) and not `overwrite`.
    """
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    from merge_distill.data import build_rows
    from merge_distill.models import cut_vocab, load_tokenizer, tokenizer_source
    from merge_distill.rundir import write_json_atomic
    from merge_distill.signals import shift_targets
    from merge_distill.teachers import NonFiniteError

    section = recipe.cache
    if section is None:
        raise UserError("cache: the recipe has no cache section; add one, e.g. cache: {dir: cache/teachers, k: 64}")
    console = console or Console()
    started = time.perf_counter()
    tokenizer = load_tokenizer(*tokenizer_source(recipe))
    vocab_size = len(tokenizer)
    if section.k > vocab_size:
        raise UserError(f"cache.k is {section.k} but the vocabulary has {vocab_size} tokens; use at most {vocab_size}")
    sources = [build_rows(s, f"data.train[{i}]", tokenizer, recipe.data.seq_len, recipe.data.packing)
               for i, s in enumerate(recipe.data.train)]
    manifest = full_manifest(recipe, tokenizer, sources)
    root = Path(section.dir)
    cached = read_manifest(root)
    if cached is not None:
        problems = manifest_differences(cached, manifest, root, writing=True)
        if problems and not overwrite:
            raise UserError([*problems, f"cache.dir: {root} holds a cache for other settings; pass --overwrite to replace it"])
        if problems:
            shutil.rmtree(root)
    elif root.is_dir() and any(root.iterdir()):
        if not overwrite:
            raise UserError(f"cache.dir: {root} exists and is not a cache (no manifest.json); choose an empty or new "
                            "folder, or pass --overwrite to replace it")
        shutil.rmtree(root)
    root.mkdir(parents=True, exist_ok=True)
    write_json_atomic(root / "manifest.json", manifest)

    todo, kept = [], 0
    for rows, entry in zip(sources, manifest["sources"]):
        folder = root / "sources" / entry["folder"]
        folder.mkdir(parents=True, exist_ok=True)
        for shard in range(entry["shards"]):
            final = folder / f"shard-{shard:05d}"
            if final.is_dir():
                kept += 1
            else:
                todo.append((rows, shard, final))
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    models = _load_teachers(recipe, device) if todo else []
    names = recipe.teacher_names
    batch_rows, per_shard, chunk = recipe.train.micro_batch_size, section.rows_per_shard, recipe.train.chunk_tokens
    total = sum(len(s) for s in sources)
    done_rows = total - sum(min(per_shard, len(rows) - shard * per_shard) for rows, shard, _ in todo)
    written = 0
    columns_bar = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("rows"),
                   TimeElapsedColumn(), TimeRemainingColumn()]
    with Progress(*columns_bar, console=console, disable=not show_progress) as progress:
        task = progress.add_task(f"caching {len(names)} teachers (top-{section.k})", total=total, completed=done_rows)
        for rows, shard, final in todo:
            start, stop = shard * per_shard, min(len(rows), (shard + 1) * per_shard)
            parts: dict[str, list[np.ndarray]] = {}
            for b in range(start, stop, batch_rows):
                sl = slice(b, min(stop, b + batch_rows))
                input_ids, attention = rows.input_ids[sl].to(device), rows.attention_mask[sl].to(device)
                targets = shift_targets(rows.labels[sl]).to(device)
                for j, (name, model) in enumerate(zip(names, models)):
                    with torch.inference_mode():
                        logits = cut_vocab(model(input_ids=input_ids, attention_mask=attention, use_cache=False).logits, vocab_size)
                    out = teacher_targets(logits, targets, section.k, recipe.loss.temperature, chunk)
                    valid = targets != IGNORE_INDEX
                    if not (torch.isfinite(out["nll"][valid]).all() and torch.isfinite(out["values"]).all()):
                        raise NonFiniteError(f"teacher {name!r} produced NaN/inf log-probabilities on rows {sl.start}.."
                                             f"{sl.stop - 1} of {rows.label}")
                    parts.setdefault(f"t{j}_ids", []).append(out["ids"].cpu().numpy())
                    parts.setdefault(f"t{j}_values", []).append(_to_storage(out["values"], section.dtype))
                    for field in ("tail", "nll", "entropy"):
                        parts.setdefault(f"t{j}_{field}", []).append(out[field].float().cpu().numpy())
                progress.advance(task, sl.stop - sl.start)
            columns = {"row": np.arange(start, stop, dtype=np.int64)}
            columns.update({name: np.concatenate(chunks) for name, chunks in parts.items()})
            _save_shard(columns, final)
            written += stop - start
    manifest["complete"] = True
    write_json_atomic(root / "manifest.json", manifest)
    return CacheWriteResult(root, len(todo), kept, written, time.perf_counter() - started)
