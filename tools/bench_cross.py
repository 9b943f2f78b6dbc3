"""The online step with K = 3 teachers of three different tokenizers vs K = 3 sharing the student's.

Workload (random init, built here, nothing downloaded): the student's tokenizer is a 4096-token
byte-level BPE trained on standard-library Python; the cross-tokenizer teachers use it, a
4096-token SentencePiece BPE with byte fallback, and a 4096-token byte-level BPE that splits
digits; the same-tokenizer run uses three teachers on the student's tokenizer. Rows of 256
tokens, uniform router, forward KL, align.k 64. Shapes (`--size`):
- `tiny` (the default): teachers Llama hidden 128, 4 layers, MLP 384; student hidden 96, 2
  layers; micro-batch 8; the tokenizers' 4096 tokens;
- `135m`: the shapes of recipes/cross_smollm2_gemma.yaml's models: every teacher of
  SmolLM2-135M's shape (hidden 576, 30 layers, MLP 1536, 9 heads, 3 KV heads), the student its
  first 8 layers; every tokenizer padded with unused tokens up to SmolLM2's 49,152 (so each
  teacher's softmax and top-k cover as many tokens as SmolLM2's); micro-batch 2.
Each of --reps fresh processes sets up both runs, takes --warmup steps of each, then times
--steps train_step calls of each, alternating between them (drift on a shared machine reaches
both alike); the ratio is the median of the per-pair ratios. Both variants run with glibc malloc
keeping freed memory (STEADY_MALLOC, as tools/bench.py; --glibc-defaults runs without, and every
rep prints page faults and system time per step). Per variant the time inside the teacher
forwards, and for the cross run inside the top-k, the alignment (align_row) and the projection
(project_topk): where the extra time goes.

    python tools/bench_cross.py --reps 5 --steps 8                 # the tiny table in docs/CROSS_TOKENIZER.md
    python tools/bench_cross.py --size 135m --reps 2 --steps 3     # the 135m table there
"""

from __future__ import annotations

import argparse
import io
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))
from bench import STEADY_MALLOC, llama  # noqa: E402  (the same malloc settings as tools/bench.py, and why)
SEQ_LEN, VOCAB = 256, 4096  # rows of the student's tokens; the tokens each tokenizer is trained to
VARIANTS = ("same", "cross")


@dataclass(frozen=True)
class CrossSize:
    vocab: int                                     # every tokenizer padded with unused tokens up to this
    batch: int                                     # micro-batch rows
    teacher: tuple[int, int, int, int, int]        # hidden, layers, MLP, heads, KV heads
    student: tuple[int, int, int, int, int]


SIZES = {
    "tiny": CrossSize(VOCAB, 8, (128, 4, 384, 2, 2), (96, 2, 192, 2, 2)),
    "135m": CrossSize(49152, 2, (576, 30, 1536, 9, 3), (576, 8, 1536, 9, 3)),  # SmolLM2-135M; its first 8 layers
}


def build_assets(work: Path, size: CrossSize) -> None:
    import yaml

    from merge_distill.pico import (
        build_bpe_tokenizer,
        build_digit_bpe_tokenizer,
        build_sentencepiece_tokenizer,
        prose_texts,
        stdlib_texts,
    )

    work.mkdir(parents=True, exist_ok=True)
    texts = stdlib_texts(limit_files=60, max_chars=8000) + prose_texts(60)
    tokenizers = {"bl": build_bpe_tokenizer(texts, VOCAB, work / "tok-bl"),
                  "sp": build_sentencepiece_tokenizer(texts, VOCAB, work / "tok-sp"),
                  "dg": build_digit_bpe_tokenizer(texts, VOCAB, work / "tok-dg")}
    for tokenizer in tokenizers.values():
        if size.vocab > len(tokenizer):  # unused tokens: the softmax and the top-k cover all of them
            tokenizer.add_tokens([f"<unused_{i}>" for i in range(size.vocab - len(tokenizer))])
    with open(work / "data.jsonl", "w", encoding="utf-8") as fh:
        for text in texts:
            fh.write(json.dumps({"text": text}) + "\n")
    models = [("same0", "bl", 1), ("same1", "bl", 2), ("same2", "bl", 3), ("cross_sp", "sp", 4), ("cross_dg", "dg", 5)]
    for name, tok, seed in models:
        llama(len(tokenizers[tok]), 2 * SEQ_LEN, seed, size.teacher).save_pretrained(work / name)
        tokenizers[tok].save_pretrained(work / name)
    llama(len(tokenizers["bl"]), 2 * SEQ_LEN, 10, size.student).save_pretrained(work / "student")
    tokenizers["bl"].save_pretrained(work / "student")
    for variant, teachers in (("same", ["same0", "same1", "same2"]), ("cross", ["same0", "cross_sp", "cross_dg"])):
        recipe = {
            "name": f"bench-cross-{variant}",
            "teachers": [{"name": t, "model": str(work / t)} for t in teachers],
            "student": {"model": str(work / "student")},
            "data": {"seq_len": SEQ_LEN, "train": [{"type": "jsonl", "path": str(work / "data.jsonl"), "domain": "code"}]},
            "routing": {"kind": "uniform"}, "loss": {"kind": "forward_kl"}, "align": {"k": 64},
            "train": {"steps": 1000, "micro_batch_size": size.batch, "lr": 1e-3, "schedule": "constant", "max_grad_norm": None,
                      "log_every": 10**6},
            "output": {"dir": str(work / f"run-{variant}")},
        }
        (work / f"{variant}.yaml").write_text(yaml.safe_dump(recipe, sort_keys=False))


def teacher_tokens(work: Path, rows: int = 64, batch: int = 8) -> dict[str, tuple[float, float]]:
    """Per cross teacher: its mean tokens per student row of SEQ_LEN tokens, and the mean longest
    row of each batch of `batch` (what one padded forward would compute per row)."""
    from merge_distill.align import TokenBytes, align_row
    from merge_distill.models import load_tokenizer
    from merge_distill.plan import training_rows
    from merge_distill.recipe import load_recipe

    recipe = load_recipe(work / "cross.yaml")
    student = load_tokenizer(str(work / "student"))
    source = training_rows(recipe, student)[0]
    student_bytes = TokenBytes(student)
    out = {}
    for name in ("cross_sp", "cross_dg"):
        teacher = TokenBytes(load_tokenizer(str(work / name)))
        head = source.take(slice(0, rows))
        lengths = [len(align_row(ids[mask.bool()].tolist(), student_bytes, teacher).teacher_ids)
                   for ids, mask in zip(head.input_ids, head.attention_mask)]
        longest = [max(lengths[i: i + batch]) for i in range(0, len(lengths), batch)]
        out[name] = (statistics.mean(lengths), statistics.mean(longest))
    return out


def worker(work: Path, warmup: int, steps: int) -> dict:
    """Both variants in one process, their steps alternated (same, cross, same, cross, ...), so that
    the machine's drift reaches both alike. Per variant: ms per step (median over steps) and the
    time inside alignment and projection; the ratio is the median of the per-pair ratios."""
    import torch
    from rich.console import Console

    import merge_distill.sources.aligned as aligned
    from merge_distill.engine import setup_run, train_step
    from merge_distill.recipe import load_recipe

    torch.set_num_threads(1)
    spent = {"align": 0.0, "project": 0.0, "topk": 0.0}

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
    torch.Tensor.topk = timed("topk", torch.Tensor.topk)
    runs = {v: setup_run(load_recipe(work / f"{v}.yaml"), overwrite=True, console=Console(file=io.StringIO()))
            for v in VARIANTS}
    forward_s = dict.fromkeys(VARIANTS, 0.0)
    for variant, run in runs.items():  # teacher forwards, timed by hooks on every teacher model
        for model in run.training.source.models:
            model.register_forward_pre_hook(lambda *_: spent.__setitem__("t0", time.perf_counter()))
            model.register_forward_hook(lambda *_, v=variant: forward_s.__setitem__(
                v, forward_s[v] + time.perf_counter() - spent["t0"]))
    for step in range(warmup):
        for run in runs.values():
            train_step(run.training, run.plan, step)
    times: dict[str, list[float]] = {v: [] for v in VARIANTS}
    faults: dict[str, list[float]] = {v: [] for v in VARIANTS}
    system: dict[str, list[float]] = {v: [] for v in VARIANTS}
    spent = {"align": 0.0, "project": 0.0, "topk": 0.0}
    forward_s = dict.fromkeys(VARIANTS, 0.0)
    for step in range(warmup, warmup + steps):
        for variant, run in runs.items():
            usage, start = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
            train_step(run.training, run.plan, step)
            times[variant].append(time.perf_counter() - start)
            after = resource.getrusage(resource.RUSAGE_SELF)
            faults[variant].append(after.ru_minflt - usage.ru_minflt)
            system[variant].append(after.ru_stime - usage.ru_stime)
    return {"ms_per_step": {v: 1e3 * statistics.median(t) for v, t in times.items()},
            "ratio": statistics.median(c / s for s, c in zip(times["same"], times["cross"])),
            "align_ms": 1e3 * spent["align"] / steps, "project_ms": 1e3 * spent["project"] / steps,
            "topk_ms": 1e3 * spent["topk"] / steps, "forward_ms": {v: 1e3 * t / steps for v, t in forward_s.items()},
            "faults": {v: statistics.median(f) for v, f in faults.items()},
            "system_ms": {v: 1e3 * statistics.median(t) for v, t in system.items()},
            "source": {v: type(r.training.source).__name__ for v, r in runs.items()}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="tiny", choices=sorted(SIZES), help="the models' shapes (see above)")
    parser.add_argument("--work", type=Path, default=None, help="default /tmp/merge_distill_bench_cross[-SIZE]")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--glibc-defaults", action="store_true",
                        help="run with glibc malloc's defaults instead of STEADY_MALLOC (to see their effect)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    size = SIZES[args.size]
    args.work = args.work or Path("/tmp/merge_distill_bench_cross" + ("" if args.size == "tiny" else f"-{args.size}"))
    if args.worker:
        print(json.dumps(worker(args.work, args.warmup, args.steps)), flush=True)
        return
    build_assets(args.work, size)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": str(ROOT), **({} if args.glibc_defaults else STEADY_MALLOC)}
    for name in STEADY_MALLOC if args.glibc_defaults else ():
        env.pop(name, None)
    reps = []
    for rep in range(args.reps):
        cmd = [sys.executable, __file__, "--worker", "--work", str(args.work), "--steps", str(args.steps),
               "--warmup", str(args.warmup)]
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=3600)
        lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
        if proc.returncode or not lines:
            raise RuntimeError(f"worker failed:\n{proc.stderr[-4000:]}")
        r = json.loads(lines[-1])
        reps.append(r)
        print(f"rep {rep + 1}: same {r['ms_per_step']['same']:.0f} ms/step ({r['source']['same']}), cross "
              f"{r['ms_per_step']['cross']:.0f} ms/step ({r['source']['cross']}; teacher forwards "
              f"{r['forward_ms']['cross']:.0f} vs {r['forward_ms']['same']:.0f} ms, top-k {r['topk_ms']:.0f} ms, "
              f"align {r['align_ms']:.0f} ms, projection {r['project_ms']:.0f} ms); cross / same {r['ratio']:.2f}; "
              f"per step: page faults {r['faults']['same']:.0f} / {r['faults']['cross']:.0f}, system time "
              f"{r['system_ms']['same']:.0f} / {r['system_ms']['cross']:.0f} ms (same / cross)", flush=True)

    def median(key: str, variant: str | None = None) -> float:
        return statistics.median(r[key][variant] if variant else r[key] for r in reps)

    ratios = [r["ratio"] for r in reps]
    print(f"\nsize {args.size} (V = {size.vocab:,}), K = 3, batch {size.batch} x {SEQ_LEN}, 1 thread, {args.reps} processes x {args.steps} timed steps per variant "
          f"(after {args.warmup}), steps alternated between the variants, "
          f"{'glibc malloc defaults' if args.glibc_defaults else 'glibc malloc keeping freed memory (STEADY_MALLOC, tools/bench.py)'}; "
          "medians\n")
    print("| teachers | ms per step | vs same tokenizer | teacher forwards | top-k | alignment | projection |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    print(f"| 3 x the student's tokenizer | {median('ms_per_step', 'same'):.0f} | 1.00 | "
          f"{median('forward_ms', 'same'):.0f} ms | 0 ms | 0 ms | 0 ms |")
    print(f"| byte-level BPE + SentencePiece + digit-split BPE | {median('ms_per_step', 'cross'):.0f} | "
          f"{statistics.median(ratios):.2f} | {median('forward_ms', 'cross'):.0f} ms | {median('topk_ms'):.0f} ms | "
          f"{median('align_ms'):.0f} ms | {median('project_ms'):.0f} ms |")
    print(f"\ncross / same per process (median over its step pairs): {', '.join(f'{r:.2f}' for r in ratios)}; "
          f"largest {max(ratios):.2f}")
    for name, (mean, longest) in teacher_tokens(args.work, batch=size.batch).items():
        print(f"{name}: {mean:.0f} tokens per {SEQ_LEN}-token student row; the longest row of a batch of {size.batch}: "
              f"{longest:.0f} "
              "on average (what one padded forward computes per row)")


if __name__ == "__main__":
    main()
