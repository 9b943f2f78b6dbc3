"""Data preparation at scale: time and peak RSS per process to tokenize, pack and store a corpus.

Corpus (built here, nothing downloaded): every .py file of the standard library as one jsonl
example, repeated until the file reaches the size asked (10 MB, 100 MB, 1 GB). Tokenizer: an
8192-token byte-level BPE trained on standard-library Python. Rows: seq_len 1024, packed.

Each figure comes from a fresh process (peak RSS is that process's, or its largest worker's;
"of which anonymous" is the largest RSS minus file-backed pages sampled every 20 ms over the
process and its workers: memory-mapped files count in RSS as their pages are read, but those pages
belong to the kernel's page cache, are shared by every process that maps the file and are dropped
under memory pressure):
- tokenizer alone: the fast tokenizer over the jsonl in batches of 1,000 texts, ids discarded
  (the throughput the build is held to: within 1.5x);
- first start: `merge_distill.rowstore.build_rows` into an empty store (reading the jsonl into
  Arrow, tokenizing with datasets.map, packing, writing rows.arrow);
- second start: the same call once the store holds the rows (fingerprint, then memory-map);
- before (with --before COMMIT): the in-RAM code of that commit (`data.build_rows`) on the same
  file, run from a git worktree.

    python tools/bench_scale.py --sizes 10 100 1000 --before 2456b5c   # the table in docs/PERFORMANCE.md

With --nproc N, training, cache writing and evaluation on 1 and N processes (CPU, gloo):
tokens/s, the efficiency (tokens/s at N / (N x tokens/s at 1)) and the share of each teacher's
bytes every process holds. Workload (random init, built here): a 4096-token byte-level BPE on
standard-library Python, rows of 256 tokens; two Llama teachers (hidden 128, 4 layers), a student
(hidden 64, 2 layers); micro-batch 4 rows per process; the default cache setting. Three setups:
1 process; N processes with ZeRO-3 teachers (DeepSpeed, `use_deepspeed: auto`); N processes with
whole teachers (`use_deepspeed: never`: the same split of the rows without ZeRO-3's gathers).
Each measurement is a fresh launch, one torch thread per process; setups are interleaved and the
table shows medians.

    python tools/bench_scale.py --nproc 2 --reps 3        # the phase table in docs/PERFORMANCE.md
"""

from __future__ import annotations

import argparse
import io
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import sysconfig
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, os.environ.get("BENCH_SCALE_PACKAGE", str(ROOT)))  # --before: the old tree
SEQ_LEN, VOCAB, MB = 1024, 8192, 1 << 20
PHASE_SEQ_LEN, PHASES = 256, ("train", "cache", "eval")


def build_corpus(work: Path, size_mb: int) -> Path:
    path = work / f"corpus-{size_mb}mb.jsonl"
    if path.exists() and path.stat().st_size >= size_mb * MB:
        return path
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    lines = [json.dumps({"text": p.read_text(encoding="utf-8", errors="ignore")}) + "\n"
             for p in sorted(stdlib.rglob("*.py")) if "site-packages" not in p.parts]
    written = 0
    with open(path, "w", encoding="utf-8") as fh:
        while written < size_mb * MB:
            for line in lines:
                fh.write(line)
                written += len(line.encode())
                if written >= size_mb * MB:
                    break
    return path


def build_tokenizer(work: Path) -> Path:
    out = work / "tokenizer"
    if not (out / "tokenizer.json").exists():
        from merge_distill.pico import stdlib_texts, build_bpe_tokenizer

        build_bpe_tokenizer(stdlib_texts(limit_files=400, max_chars=20000), VOCAB, out)
    return out


def peak_rss_mib() -> float:
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    workers = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return max(own, workers) / 1024


class AnonSampler:
    """Peak anonymous memory of this process and of each of its workers, sampled every 20 ms:
    RSS minus its file-backed part. Memory-mapped Arrow files count in RSS as their pages are read,
    but those pages are the kernel's page cache, shared by every process that maps the file and
    dropped under pressure; anonymous memory is what a process holds on its own."""

    def __init__(self) -> None:
        import psutil

        self.me, self.peak, self.stop = psutil.Process(), 0, threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        import psutil

        while not self.stop.wait(0.02):
            for proc in [self.me, *self.me.children(recursive=True)]:
                try:
                    info = proc.memory_info()
                except psutil.Error:
                    continue
                self.peak = max(self.peak, info.rss - info.shared)

    def peak_mib(self) -> float:
        self.stop.set()
        self.thread.join()
        return self.peak / MB


def child(mode: str, corpus: str, tokenizer_dir: str, store: str) -> dict:
    """One measurement in this (fresh) process."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    sampler = AnonSampler()
    started = time.perf_counter()
    if mode == "tokenizer":
        tokens, batch = 0, []
        with open(corpus, encoding="utf-8") as fh:
            for line in fh:
                batch.append(json.loads(line)["text"])
                if len(batch) == 1000:
                    tokens += sum(map(len, tokenizer(batch, add_special_tokens=False)["input_ids"]))
                    batch = []
        if batch:
            tokens += sum(map(len, tokenizer(batch, add_special_tokens=False)["input_ids"]))
        return {"seconds": time.perf_counter() - started, "rss_mib": peak_rss_mib(),
                "anon_mib": sampler.peak_mib(), "tokens": tokens}
    from merge_distill.schema import DataSource

    source = DataSource(type="jsonl", path=corpus, domain="code")
    if mode == "before":
        from merge_distill.data import build_rows as old_build_rows  # the worktree's in-RAM code

        rows = old_build_rows(source, "data.train[0]", tokenizer, SEQ_LEN, True)
    else:
        from merge_distill.rowstore import build_rows

        rows = build_rows(source, "data.train[0]", tokenizer, SEQ_LEN, True, Path(store))
    return {"seconds": time.perf_counter() - started, "rss_mib": peak_rss_mib(), "anon_mib": sampler.peak_mib(),
            "rows": len(rows)}


def measure(mode: str, corpus: Path, tokenizer_dir: Path, store: Path, pythonpath: Path = ROOT) -> dict:
    env = {**os.environ, "BENCH_SCALE_PACKAGE": str(pythonpath), "HF_DATASETS_CACHE": str(store.parent / "hf-datasets")}
    out = subprocess.run([sys.executable, __file__, "--child", mode, str(corpus), str(tokenizer_dir), str(store)],
                         env=env, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise SystemExit(f"{mode} on {corpus.name} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


# ---- training, cache writing and evaluation on 1 and N processes ----------------------------


def build_phase_assets(work: Path, rows: int, steps: int) -> Path:
    """Tokenizer, models, data and the recipe of the phase table; returns the recipe's path."""
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
        "name": "bench-phases",
        "teachers": [{"name": f"t{i}", "model": str(work / f"teacher{i}")} for i in range(2)],
        "student": {"model": str(work / "student")},
        "data": {"seq_len": PHASE_SEQ_LEN, "tokenized_dir": str(work / "tokenized"),
                 "train": [{"type": "jsonl", "path": str(work / "data.jsonl"), "domain": "code"}],
                 "eval": [{"type": "jsonl", "path": str(work / "data.jsonl"), "domain": "code"}],
                 "eval_tokens": rows * PHASE_SEQ_LEN},
        "train": {"steps": steps, "micro_batch_size": 4, "schedule": "constant", "log_every": 10**6},
        "output": {"dir": str(work / "run")},
        # top-k at every process count (auto would store hidden states in 1 process and top-k under ZeRO-3)
        "cache": {"dir": str(work / "cache"), "rows_per_shard": 16, "store": "topk"},
    }
    path = work / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


def phase_worker(recipe_path: Path, phase: str, whole: bool, warmup: int) -> None:
    """One process of a launch: run the phase, print {"seconds", "loop_seconds", "tokens", "held"}
    on rank 0. tokens: every token the phase read, over all processes."""
    import torch
    from rich.console import Console

    from merge_distill import distributed as dist_mod
    from merge_distill.cache.writer import write_cache
    from merge_distill.engine import setup_run, train_step
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
    start = time.perf_counter()
    if phase == "train":
        run = setup_run(recipe, overwrite=True, console=Console(file=io.StringIO()))
        for step in range(warmup):
            train_step(run.training, run.plan, step)
        opened[:] = [time.perf_counter()]  # timed: the steps after the warm-up
        for step in range(warmup, recipe.train.steps):
            train_step(run.training, run.plan, step)
        rows = (recipe.train.steps - warmup) * recipe.train.micro_batch_size * dist_mod.world_info()["world_size"]
    elif phase == "cache":
        rows = write_cache(recipe, console=Console(file=io.StringIO()), overwrite=True, show_progress=False).rows_written
    else:
        accelerator = dist_mod.accelerator_for(recipe)
        tokenizer = load_tokenizer(str(recipe.teachers[0].model))
        evaluate_run(recipe, accelerator, None, tokenizer)
        rows = sum(len(r[0]) for r in eval_rows(recipe, tokenizer).values())
    end = time.perf_counter()
    if dist_mod.world_info()["rank"] == 0:
        print(json.dumps({"seconds": end - start, "loop_seconds": end - opened[0], "tokens": rows * PHASE_SEQ_LEN,
                          "held": held}), flush=True)


def launch_phase(recipe: Path, phase: str, nproc: int, whole: bool, warmup: int) -> dict:
    from merge_distill.distributed import _free_port, launcher_prefix

    if phase == "cache":
        shutil.rmtree(recipe.parent / "cache", ignore_errors=True)  # every run writes every row
    prefix = launcher_prefix(nproc, launcher="torchrun", master_port=_free_port()) if nproc > 1 else [sys.executable]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": str(ROOT), "CUDA_VISIBLE_DEVICES": ""}
    mode = ["--whole"] if whole else []
    proc = subprocess.run(prefix + [__file__, "--phase-worker", phase, "--recipe", str(recipe), "--warmup", str(warmup),
                                    *mode], env=env, capture_output=True, text=True, timeout=3600)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode or not lines:
        raise RuntimeError(f"{phase} on {nproc} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    return json.loads(lines[-1])


def phase_table(work: Path, nproc: int, reps: int, rows: int, warmup: int, steps: int) -> None:
    recipe = build_phase_assets(work, rows, warmup + steps)
    results: dict[tuple[str, str], list[dict]] = {}
    setups = [("1", 1, False), (f"{nproc}, ZeRO-3", nproc, False), (f"{nproc}, whole", nproc, True)]
    for rep in range(reps):
        for phase in PHASES:
            for label, n, whole in setups:
                results.setdefault((phase, label), []).append(launch_phase(recipe, phase, n, whole, warmup))
                r = results[(phase, label)][-1]
                print(f"rep {rep + 1} {phase} x{label}: {r['seconds']:.1f} s ({r['loop_seconds']:.1f} s timed), "
                      f"{r['tokens']} tokens", flush=True)
    print(f"\nMedians of {reps}; one torch thread per process, {os.cpu_count()} cores. 'timed': training, {steps} steps "
          f"after {warmup}; cache and evaluation, from the teachers loaded to the end. 'phase': the whole phase, "
          "tokenizing and loading included. Efficiency = tokens/s at N / (N x tokens/s at 1).\n")
    print("| phase | processes | tokens | s timed | tokens/s | efficiency | s for the phase | "
          "teacher bytes held per process |")
    print("|---|---:|---:|---:|---:|---:|---:|---|")
    for phase in PHASES:
        base = None
        for label, n, _ in setups:
            runs = results[(phase, label)]
            loop = statistics.median(r["loop_seconds"] for r in runs)
            tokens = runs[0]["tokens"]
            rate = tokens / loop
            base = base or rate
            held = ", ".join(f"{h:.3f}" for h in runs[0]["held"])
            print(f"| {phase} | {label} | {tokens:,} | {loop:.1f} | {rate:,.0f} | {rate / (n * base):.2f} | "
                  f"{statistics.median(r['seconds'] for r in runs):.1f} | {held} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", help="corpus sizes in MB (default 10 100)")
    parser.add_argument("--before", help="a commit whose in-RAM data code to measure on the 100 MB corpus")
    parser.add_argument("--work", type=Path, default=ROOT / ".cache" / "bench_scale")
    parser.add_argument("--nproc", type=int, help="also measure training, cache writing and evaluation on 1 and N "
                        "processes (and skip data preparation unless --sizes is given)")
    parser.add_argument("--reps", type=int, default=3, help="repetitions of the phase table (medians)")
    parser.add_argument("--rows", type=int, default=384, help="evaluation rows of the phase table")
    parser.add_argument("--steps", type=int, default=8, help="timed training steps of the phase table")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    parser.add_argument("--phase-worker", help=argparse.SUPPRESS)
    parser.add_argument("--recipe", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--whole", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(*args.child)))
        return
    if args.phase_worker:
        phase_worker(args.recipe, args.phase_worker, args.whole, args.warmup)
        return
    if args.nproc:
        phase_table(args.work / "phases", args.nproc, args.reps, args.rows, args.warmup, args.steps)
        if args.sizes is None:
            return
        print()
    args.sizes = args.sizes or [10, 100]
    args.work.mkdir(parents=True, exist_ok=True)
    tokenizer_dir = build_tokenizer(args.work)
    print(f"data preparation: jsonl of standard-library Python, {VOCAB}-token byte-level BPE, seq_len {SEQ_LEN}, "
          f"packed; {os.cpu_count()} cores\n")
    print("| corpus | tokens | tokenizer alone | first start | ratio | peak RSS (first start) | of which anonymous | "
          "second start | peak RSS (second) |")
    print("|---|---|---|---|---|---|---|---|---|")
    results = {}
    for size in args.sizes:
        corpus = build_corpus(args.work, size)
        store = args.work / f"store-{size}" / "tokenized"
        shutil.rmtree(store.parent, ignore_errors=True)
        alone = measure("tokenizer", corpus, tokenizer_dir, store)
        first = measure("build", corpus, tokenizer_dir, store)
        second = measure("build", corpus, tokenizer_dir, store)
        results[size] = (alone, first, second)
        print(f"| {size} MB | {alone['tokens'] / 1e6:.1f}M | {alone['seconds']:.1f} s ({alone['rss_mib']:.0f} MiB) | "
              f"{first['seconds']:.1f} s | {first['seconds'] / alone['seconds']:.2f}x | {first['rss_mib']:.0f} MiB | "
              f"{first['anon_mib']:.0f} MiB | {second['seconds']:.2f} s | {second['rss_mib']:.0f} MiB |", flush=True)
        shutil.rmtree(store.parent, ignore_errors=True)
    if args.before:
        size = 100
        corpus = build_corpus(args.work, size)
        tree = args.work / "before-tree"
        subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(tree)], capture_output=True)
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(tree), args.before], check=True,
                       capture_output=True)
        try:
            before = measure("before", corpus, tokenizer_dir, args.work / "store-before" / "tokenized", pythonpath=tree)
        finally:
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(tree)], capture_output=True)
        print(f"\nbefore ({args.before}, in-RAM lists and int64 tensors), {size} MB: {before['seconds']:.1f} s, "
              f"peak RSS {before['rss_mib']:.0f} MiB (anonymous {before['anon_mib']:.0f} MiB), {before['rows']} rows")
        if size in results:
            first = results[size][1]
            print(f"after, {size} MB: first start {first['seconds']:.1f} s, peak RSS {first['rss_mib']:.0f} MiB; "
                  f"second start {results[size][2]['seconds']:.2f} s")


if __name__ == "__main__":
    main()
