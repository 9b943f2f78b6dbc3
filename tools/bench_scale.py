"""Data preparation at scale: time and peak RSS per process to tokenize, pack and store a corpus.

Corpus (built here, nothing downloaded): every .py file of the standard library as one jsonl
example, repeated until the file reaches the size asked (10 MB, 100 MB, 1 GB). Tokenizer: an
8192-token byte-level BPE trained on standard-library Python. Rows: seq_len 1024, packed.

Each figure comes from a fresh process (peak RSS is that process's, or its largest worker's):
- tokenizer alone: the fast tokenizer over the jsonl in batches of 1,000 texts, ids discarded
  (the throughput the build is held to: within 1.5x);
- first start: `merge_distill.rowstore.build_rows` into an empty store (reading the jsonl into
  Arrow, tokenizing with datasets.map, packing, writing rows.arrow);
- second start: the same call once the store holds the rows (fingerprint, then memory-map);
- before (with --before COMMIT): the in-RAM code of that commit (`data.build_rows`) on the same
  file, run from a git worktree.

    python tools/bench_scale.py --sizes 10 100 1000 --before 2456b5c   # the table in docs/PERFORMANCE.md
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, os.environ.get("BENCH_SCALE_PACKAGE", str(ROOT)))  # --before: the old tree
SEQ_LEN, VOCAB, MB = 1024, 8192, 1 << 20


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


def child(mode: str, corpus: str, tokenizer_dir: str, store: str) -> dict:
    """One measurement in this (fresh) process."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
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
        return {"seconds": time.perf_counter() - started, "rss_mib": peak_rss_mib(), "tokens": tokens}
    from merge_distill.schema import DataSource

    source = DataSource(type="jsonl", path=corpus, domain="code")
    if mode == "before":
        from merge_distill.data import build_rows as old_build_rows  # the worktree's in-RAM code

        rows = old_build_rows(source, "data.train[0]", tokenizer, SEQ_LEN, True)
    else:
        from merge_distill.rowstore import build_rows

        rows = build_rows(source, "data.train[0]", tokenizer, SEQ_LEN, True, Path(store))
    return {"seconds": time.perf_counter() - started, "rss_mib": peak_rss_mib(), "rows": len(rows)}


def measure(mode: str, corpus: Path, tokenizer_dir: Path, store: Path, pythonpath: Path = ROOT) -> dict:
    env = {**os.environ, "BENCH_SCALE_PACKAGE": str(pythonpath), "HF_DATASETS_CACHE": str(store.parent / "hf-datasets")}
    out = subprocess.run([sys.executable, __file__, "--child", mode, str(corpus), str(tokenizer_dir), str(store)],
                         env=env, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise SystemExit(f"{mode} on {corpus.name} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[10, 100], help="corpus sizes in MB")
    parser.add_argument("--before", help="a commit whose in-RAM data code to measure on the 100 MB corpus")
    parser.add_argument("--work", type=Path, default=ROOT / ".cache" / "bench_scale")
    parser.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(*args.child)))
        return
    args.work.mkdir(parents=True, exist_ok=True)
    tokenizer_dir = build_tokenizer(args.work)
    print(f"data preparation: jsonl of standard-library Python, {VOCAB}-token byte-level BPE, seq_len {SEQ_LEN}, "
          f"packed; {os.cpu_count()} cores\n")
    print("| corpus | tokens | tokenizer alone | first start | ratio | peak RSS (first start) | second start | peak RSS (second) |")
    print("|---|---|---|---|---|---|---|---|")
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
              f"{second['seconds']:.2f} s | {second['rss_mib']:.0f} MiB |", flush=True)
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
              f"peak RSS {before['rss_mib']:.0f} MiB, {before['rows']} rows")
        if size in results:
            first = results[size][1]
            print(f"after, {size} MB: first start {first['seconds']:.1f} s, peak RSS {first['rss_mib']:.0f} MiB; "
                  f"second start {results[size][2]['seconds']:.2f} s")


if __name__ == "__main__":
    main()
