"""Cache writing and evaluation on 1 and N processes: wall time per row, and teacher bytes held.

Both phases get their teachers from the online teacher source, ZeRO-3 sharded under DeepSpeed
when N > 1 (`use_deepspeed: auto`), and split the rows over the processes (docs/ARCHITECTURE.md).
A third setup keeps whole teachers on every process (`use_deepspeed: never`): the same split of
the rows without ZeRO-3's gathers, to show what each costs.
Workload (random init, built here, nothing downloaded): a 4096-token byte-level BPE on standard-
library Python, rows of 256 tokens; two Llama teachers (hidden 128, 4 layers, MLP 256), a student
(hidden 64, 2 layers); micro-batch 4 rows; cache top-64 float16. Each measurement is a fresh
launch; the phase's own wall time is timed inside the processes (imports, launcher and process
group start-up are left out; tokenizing and teacher loading are in), runs are interleaved
(1, N, 1, N, ...) and the table shows the median. One torch thread per process.

    python tools/bench_sharded.py --nproc 2 --reps 3      # the table in docs/PERFORMANCE.md
"""

from __future__ import annotations

import argparse
import io
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def build_assets(work: Path, rows: int) -> Path:
    """Tokenizer, models, data and the recipe; returns the recipe's path."""
    import yaml

    from merge_distill.pico import build_bpe_tokenizer, pico_llama, stdlib_texts

    work.mkdir(parents=True, exist_ok=True)
    texts = stdlib_texts(limit_files=80, max_chars=12000)
    tokenizer = build_bpe_tokenizer(texts, 4096, work / "tokenizer")
    for name, seed, hidden, layers in (("teacher0", 1, 128, 4), ("teacher1", 2, 128, 4), ("student", 3, 64, 2)):
        model = pico_llama(len(tokenizer), seed, hidden=hidden, layers=layers, max_len=256)
        model.save_pretrained(work / name)
        tokenizer.save_pretrained(work / name)
    with open(work / "data.jsonl", "w", encoding="utf-8") as fh:
        for text in texts:
            fh.write(json.dumps({"text": text}) + "\n")
    recipe = {
        "name": "bench-sharded",
        "teachers": [{"name": f"t{i}", "model": str(work / f"teacher{i}")} for i in range(2)],
        "student": {"model": str(work / "student")},
        "data": {"seq_len": 256, "train": [{"type": "jsonl", "path": str(work / "data.jsonl"), "domain": "code"}],
                 "eval": [{"type": "jsonl", "path": str(work / "data.jsonl"), "domain": "code"}],
                 "eval_tokens": rows * 256},
        "train": {"steps": 1, "micro_batch_size": 4},
        "output": {"dir": str(work / "run")},
        "cache": {"dir": str(work / "cache"), "k": 64, "dtype": "float16", "rows_per_shard": 16},
    }
    path = work / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


def worker(recipe_path: Path, phase: str, whole: bool) -> None:
    """One process of a launch: run the phase, print {"seconds", "rows", "held"} on rank 0."""
    import torch
    from rich.console import Console

    from merge_distill import distributed as dist_mod
    from merge_distill.cache.writer import write_cache
    from merge_distill.evaluate import eval_rows, evaluate_run
    from merge_distill.models import load_tokenizer
    from merge_distill.recipe import load_recipe
    from merge_distill.sources import OnlineTeachers

    torch.set_num_threads(1)
    held: list[float] = []
    opened: list[float] = []  # when the teachers were ready: the loop over rows starts there
    real_open = OnlineTeachers.open.__func__  # type: ignore[attr-defined]

    def recording_open(cls, *args, **kwargs):
        source = real_open(cls, *args, **kwargs)
        held.extend(mine / whole for mine, whole in source.held_bytes())
        opened.append(time.perf_counter())
        return source

    OnlineTeachers.open = classmethod(recording_open)  # type: ignore[method-assign]
    # whole: every process holds whole teachers (plain data parallel, no DeepSpeed), to separate
    # the split of the rows from the cost of ZeRO-3's gathers
    recipe = load_recipe(recipe_path, ["cache.use=false", *(["distributed.use_deepspeed=never"] if whole else [])])
    if phase == "cache":
        start = time.perf_counter()
        result = write_cache(recipe, console=Console(file=io.StringIO()), overwrite=True, show_progress=False)
        end, rows = time.perf_counter(), result.rows_written
    else:
        accelerator = dist_mod.accelerator_for(recipe)
        tokenizer = load_tokenizer(str(recipe.teachers[0].model))
        start = time.perf_counter()
        evaluate_run(recipe, accelerator, None, tokenizer)
        end = time.perf_counter()
        rows = sum(len(r[0]) for r in eval_rows(recipe, tokenizer).values())
    if dist_mod.world_info()["rank"] == 0:
        print(json.dumps({"seconds": end - start, "loop_seconds": end - opened[0], "rows": rows, "held": held}), flush=True)


def launch(recipe: Path, phase: str, nproc: int, whole: bool = False) -> dict:
    import shutil

    from merge_distill.distributed import _free_port, launcher_prefix

    if phase == "cache":
        shutil.rmtree(recipe.parent / "cache", ignore_errors=True)  # every run writes every row

    prefix = launcher_prefix(nproc, launcher="torchrun", master_port=_free_port()) if nproc > 1 else [sys.executable]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": str(ROOT), "CUDA_VISIBLE_DEVICES": ""}
    mode = ["--whole"] if whole else []
    proc = subprocess.run(prefix + [__file__, "--worker", phase, "--recipe", str(recipe), *mode], env=env,
                          capture_output=True, text=True, timeout=3600)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode or not lines:
        raise RuntimeError(f"{phase} on {nproc} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    return json.loads(lines[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path("/tmp/merge_distill_bench_sharded"))
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--rows", type=int, default=384, help="evaluation rows (the cache writes every training row)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--recipe", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--whole", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.recipe, args.worker, args.whole)
        return
    recipe = build_assets(args.work, args.rows)
    results: dict[tuple[str, str], list[dict]] = {}
    setups = [("1", 1, False), (f"{args.nproc}, ZeRO-3", args.nproc, False), (f"{args.nproc}, whole", args.nproc, True)]
    for rep in range(args.reps):
        for phase in ("cache", "eval"):
            for label, n, whole in setups:
                results.setdefault((phase, label), []).append(launch(recipe, phase, n, whole))
                r = results[(phase, label)][-1]
                print(f"rep {rep + 1} {phase} x{label}: {r['seconds']:.1f} s ({r['loop_seconds']:.1f} s over the rows), "
                      f"{r['rows']} rows", flush=True)
    print(f"\nMedians of {args.reps}. 'rows' = after the teachers are loaded (the loop over the rows); 'phase' = "
          "the whole phase, tokenizing and loading included.\n")
    print("| phase | processes | rows | s over the rows | ms per row | vs 1 process | s for the phase | "
          "teacher bytes held per process |")
    print("|---|---:|---:|---:|---:|---:|---:|---|")
    for phase in ("cache", "eval"):
        base = statistics.median(r["loop_seconds"] for r in results[(phase, "1")])
        for n, _, _ in setups:
            runs = results[(phase, n)]
            loop = statistics.median(r["loop_seconds"] for r in runs)
            whole = statistics.median(r["seconds"] for r in runs)
            rows = runs[0]["rows"]
            held = ", ".join(f"{h:.3f}" for h in runs[0]["held"])
            print(f"| {phase} | {n} | {rows} | {loop:.1f} | {1e3 * loop / rows:.0f} | {loop / base:.2f} | {whole:.1f} | {held} |")


if __name__ == "__main__":
    main()
