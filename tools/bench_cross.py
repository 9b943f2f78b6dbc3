"""The online step with K = 3 teachers of three different tokenizers vs K = 3 sharing the student's.

Workload (random init, built here, nothing downloaded): the student's tokenizer is a 4096-token
byte-level BPE trained on standard-library Python; the cross-tokenizer teachers use it, a
4096-token SentencePiece BPE with byte fallback, and a 4096-token byte-level BPE that splits
digits; the same-tokenizer run uses three teachers on the student's tokenizer. Teachers: Llama,
hidden 128, 4 layers, MLP 384; student hidden 96, 2 layers; rows of 256 tokens, micro-batch 8,
uniform router, forward KL, align.k 64. Each measurement is a fresh process (setup_run, --warmup
steps, then --steps timed train_step calls), variants interleaved, medians of --reps; the cross
run also reports the time inside the alignment (align_row) and the projection (project_topk).

    python tools/bench_cross.py --reps 3 --steps 6      # the table in docs/CROSS_TOKENIZER.md
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
SEQ_LEN, VOCAB = 256, 4096


def build_assets(work: Path) -> None:
    import yaml

    from merge_distill.pico import (
        build_bpe_tokenizer,
        build_digit_bpe_tokenizer,
        build_sentencepiece_tokenizer,
        pico_llama,
        prose_texts,
        stdlib_texts,
    )

    work.mkdir(parents=True, exist_ok=True)
    texts = stdlib_texts(limit_files=60, max_chars=8000) + prose_texts(60)
    tokenizers = {"bl": build_bpe_tokenizer(texts, VOCAB, work / "tok-bl"),
                  "sp": build_sentencepiece_tokenizer(texts, VOCAB, work / "tok-sp"),
                  "dg": build_digit_bpe_tokenizer(texts, VOCAB, work / "tok-dg")}
    with open(work / "data.jsonl", "w", encoding="utf-8") as fh:
        for text in texts:
            fh.write(json.dumps({"text": text}) + "\n")
    models = [("same0", "bl", 1), ("same1", "bl", 2), ("same2", "bl", 3), ("cross_sp", "sp", 4), ("cross_dg", "dg", 5)]
    for name, tok, seed in models:
        model = pico_llama(len(tokenizers[tok]), seed, hidden=128, layers=4, max_len=2 * SEQ_LEN)
        model.config.intermediate_size = 384
        type(model)(model.config).save_pretrained(work / name)  # rebuilt with the MLP width
        tokenizers[tok].save_pretrained(work / name)
    student = pico_llama(len(tokenizers["bl"]), 10, hidden=96, layers=2, max_len=2 * SEQ_LEN)
    student.save_pretrained(work / "student")
    tokenizers["bl"].save_pretrained(work / "student")
    for variant, teachers in (("same", ["same0", "same1", "same2"]), ("cross", ["same0", "cross_sp", "cross_dg"])):
        recipe = {
            "name": f"bench-cross-{variant}",
            "teachers": [{"name": t, "model": str(work / t)} for t in teachers],
            "student": {"model": str(work / "student")},
            "data": {"seq_len": SEQ_LEN, "train": [{"type": "jsonl", "path": str(work / "data.jsonl"), "domain": "code"}]},
            "routing": {"kind": "uniform"}, "loss": {"kind": "forward_kl"}, "align": {"k": 64},
            "train": {"steps": 1000, "micro_batch_size": 8, "lr": 1e-3, "schedule": "constant", "max_grad_norm": None,
                      "log_every": 10**6},
            "output": {"dir": str(work / f"run-{variant}")},
        }
        (work / f"{variant}.yaml").write_text(yaml.safe_dump(recipe, sort_keys=False))


def worker(work: Path, variant: str, warmup: int, steps: int) -> dict:
    import torch
    from rich.console import Console

    import merge_distill.sources.aligned as aligned
    from merge_distill.engine import setup_run, train_step
    from merge_distill.recipe import load_recipe

    torch.set_num_threads(1)
    spent = {"align": 0.0, "project": 0.0}

    def timed(name: str, fn):
        def wrapper(*args, **kwargs):
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                spent[name] += time.perf_counter() - start
        return wrapper

    aligned.align_row = timed("align", aligned.align_row)
    aligned.project_topk = timed("project", aligned.project_topk)
    run = setup_run(load_recipe(work / f"{variant}.yaml"), overwrite=True, console=Console(file=io.StringIO()))
    for step in range(warmup):
        train_step(run.training, run.plan, step)
    spent = dict.fromkeys(spent, 0.0)
    start = time.perf_counter()
    for step in range(warmup, warmup + steps):
        train_step(run.training, run.plan, step)
    seconds = time.perf_counter() - start
    return {"ms_per_step": 1e3 * seconds / steps, "align_ms": 1e3 * spent["align"] / steps,
            "project_ms": 1e3 * spent["project"] / steps, "source": type(run.training.source).__name__}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path("/tmp/merge_distill_bench_cross"))
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.work, args.worker, args.warmup, args.steps)), flush=True)
        return
    build_assets(args.work)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": str(ROOT)}
    results: dict[str, list[dict]] = {"same": [], "cross": []}
    for rep in range(args.reps):
        for variant in results:
            cmd = [sys.executable, __file__, "--worker", variant, "--work", str(args.work), "--steps", str(args.steps),
                   "--warmup", str(args.warmup)]
            proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=3600)
            lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
            if proc.returncode or not lines:
                raise RuntimeError(f"{variant} failed:\n{proc.stderr[-4000:]}")
            results[variant].append(json.loads(lines[-1]))
            r = results[variant][-1]
            print(f"rep {rep + 1} {variant}: {r['ms_per_step']:.0f} ms/step ({r['source']}; align {r['align_ms']:.0f} ms, "
                  f"projection {r['project_ms']:.0f} ms)", flush=True)
    med = {v: {k: statistics.median(r[k] for r in runs) for k in ("ms_per_step", "align_ms", "project_ms")}
           for v, runs in results.items()}
    print(f"\nK = 3, batch 8 x {SEQ_LEN}, 1 thread, medians of {args.reps} ({args.steps} timed steps after {args.warmup})\n")
    print("| teachers | ms per step | vs same tokenizer | of which alignment | of which projection |")
    print("|---|---:|---:|---:|---:|")
    for variant, label in (("same", "3 x the student's tokenizer"), ("cross", "byte-level BPE + SentencePiece + digit-split BPE")):
        m = med[variant]
        print(f"| {label} | {m['ms_per_step']:.0f} | {m['ms_per_step'] / med['same']['ms_per_step']:.2f} | "
              f"{m['align_ms']:.0f} ms | {m['project_ms']:.0f} ms |")


if __name__ == "__main__":
    main()
