"""Throughput of a fixed distillation workload: merge_distill online, merge_distill from the
teacher cache, the no-framework floor (tools/bench_floor.py) and, at K = 1, TRL's GKD trainer.

Workload (built in-process, random init, nothing downloaded), `--size tiny` (the default): a
byte-level BPE tokenizer with 4096 tokens trained on standard-library Python files, packed into
rows of 256 tokens; K = 1, 2, 3 Llama teachers (hidden 128, 4 layers, 4 heads, MLP 384: the demo
teachers' shape); a smaller Llama student (hidden 96, 2 layers, MLP 256); micro-batch 8 rows,
uniform router, mixture blend, forward KL at T = 1, AdamW at a constant lr, no clipping, float32.
The GPU sizes (tools/gpu_bench.sh) keep all of that but the shapes, with the tokenizer padded with
unused tokens up to the vocabulary: `--size 135m`, teachers and student of SmolLM2-135M's shape
(hidden 576, 30 layers, 9 heads / 3 KV heads, MLP 1536, V = 49,152) on rows of 1024 tokens;
`--size v152k`, Qwen's vocabulary (V = 151,936) on rows of 4096 tokens, teachers hidden 896 with
4 layers, student hidden 512 with 2 layers. `--precision bf16`: the engine's train.precision bf16
(bf16 teachers, the student in float32 under autocast), and the same in the floor and TRL.

Every measurement is a fresh worker process (so peak memory is its own): load, `--warmup`
steps, then `--steps` timed steps; tokens/s = steps x batch x 256 / time. Variants are
interleaved (rep 1: all variants, rep 2: all variants, ...) and the table shows the median over
`--reps`, so a burst of load from other jobs hits all variants alike. Workers run with
STEADY_MALLOC (below) unless --default-malloc.

    python tools/bench.py --reps 5 --steps 16   # CPU, 1 thread: the table in docs/PERFORMANCE.md (~25 min)
    python tools/bench.py --device cuda --threads 4
    python tools/bench.py --quick               # a smoke run: 1 rep, 2 steps
    python tools/bench.py --variants online --baseline ../old-checkout   # before/after a change

The online variant is the real engine: `setup_run` + `train_step` (data, teachers, per-token
signals, router, chunked loss, statistics, checks, backward, step). The cached variant is the
same recipe with `cache.use: true` (k = 64, float16); the caches are written first with
`write_cache`, and that time is reported separately. The fused variant (`--variants ...,fused`)
is online with `train.fused_loss: true` (losses/fused.py: no [B, T, V] logits on either side).
"""

from __future__ import annotations

import argparse
import importlib.util
import io
import json
import math
import os
import resource
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
K_MAX, CACHE_K, BPE_TOKENS = 3, 64, 4096


@dataclass(frozen=True)
class Size:
    """A workload's shapes: vocabulary, row length, and (hidden, layers, MLP, heads, KV heads) of
    the teachers and the student."""

    vocab: int
    seq: int
    teacher: tuple[int, int, int, int, int]
    student: tuple[int, int, int, int, int]


SIZES = {
    "tiny": Size(4096, 256, (128, 4, 384, 4, 4), (96, 2, 256, 4, 4)),
    "135m": Size(49152, 1024, (576, 30, 1536, 9, 3), (576, 30, 1536, 9, 3)),  # SmolLM2-135M's shape
    "v152k": Size(151936, 4096, (896, 4, 4864, 14, 2), (512, 2, 1536, 8, 2)),  # Qwen's vocabulary
    "tiny-v8k": Size(8192, 256, (128, 4, 384, 4, 4), (96, 2, 256, 4, 4)),  # the padded tokenizer on CPU (dry runs)
}
# glibc returns every freed block of 32 MiB or more to the OS (its mmap threshold moves with what
# a process freed before), so each step's big tensors fault in fresh pages, and how many depends
# on the process's history: a TRL process, which builds a dataset first, came out 15% faster
# than the floor for that reason alone. These settings keep freed memory in the heap for every
# worker alike (and make all of them about 20% faster on CPU); --default-malloc measures without.
STEADY_MALLOC = {"MALLOC_MMAP_THRESHOLD_": str(32 * 2**20), "MALLOC_TRIM_THRESHOLD_": str(16 * 2**30),
                 "MALLOC_TOP_PAD_": str(2**30)}


# ---- assets ---------------------------------------------------------------------------------


def llama(vocab_rows: int, max_positions: int, seed: int, shape: tuple[int, int, int, int, int]):
    """A randomly initialised Llama of `shape` (hidden, layers, MLP, heads, KV heads), seeded."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    hidden, layers, mlp, heads, kv_heads = shape
    return LlamaForCausalLM(LlamaConfig(
        vocab_size=vocab_rows, hidden_size=hidden, intermediate_size=mlp, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=max_positions,
        tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=0))


def recipe(work: Path, k: int, args: argparse.Namespace) -> dict:
    return {
        "name": f"bench-k{k}",
        "teachers": [{"name": f"t{i}", "model": str(work / f"teacher{i}")} for i in range(k)],
        "student": {"model": str(work / "student")},
        "data": {"seq_len": SIZES[args.size].seq,
                 "train": [{"type": "jsonl", "path": str(work / "data.jsonl"), "domain": "code"}]},
        "routing": {"kind": "uniform"},
        "loss": {"kind": "forward_kl"},
        "train": {"steps": args.warmup + args.steps, "micro_batch_size": args.batch, "lr": 1e-3, "schedule": "constant",
                  "max_grad_norm": None, "seed": 0, "log_every": 10**6, "precision": args.precision},
        "output": {"dir": str(work / f"run-k{k}")},
        "cache": {"dir": str(work / f"cache-k{k}"), "k": CACHE_K, "dtype": "float16", "store": "topk", "use": False},
    }


def build_assets(work: Path, args: argparse.Namespace) -> dict:
    """Tokenizer, data, models, recipes, the floor's rows and the caches; returns the cache write times."""
    import torch
    import yaml

    from merge_distill.cache.writer import write_cache
    from merge_distill.plan import training_rows
    from merge_distill.pico import build_bpe_tokenizer, stdlib_texts
    from merge_distill.recipe import load_recipe

    work.mkdir(parents=True, exist_ok=True)
    size = SIZES[args.size]
    texts = stdlib_texts(limit_files=60, max_chars=8000)
    tokenizer = build_bpe_tokenizer(texts, BPE_TOKENS, work / "tokenizer")
    if size.vocab > len(tokenizer):  # a larger vocabulary: unused tokens, so that the loss covers all of it
        tokenizer.add_tokens([f"<unused_{i}>" for i in range(size.vocab - len(tokenizer))])
        tokenizer.save_pretrained(work / "tokenizer")
    with open(work / "data.jsonl", "w", encoding="utf-8") as fh:
        for text in texts:
            fh.write(json.dumps({"text": text}) + "\n")
    for name, model in [*((f"teacher{i}", llama(size.vocab, 2 * size.seq, 1 + i, size.teacher)) for i in range(K_MAX)),
                        ("student", llama(size.vocab, 2 * size.seq, 10, size.student))]:
        model.save_pretrained(work / name)
        tokenizer.save_pretrained(work / name)
    for k in range(1, K_MAX + 1):
        (work / f"k{k}.yaml").write_text(yaml.safe_dump(recipe(work, k, args), sort_keys=False))
    loaded = load_recipe(work / "k1.yaml")
    rows = training_rows(loaded, tokenizer)[0]
    torch.save(rows.take(slice(0, len(rows))).input_ids, work / "rows.pt")
    cache_times = {}
    for k in range(1, K_MAX + 1):
        shutil.rmtree(work / f"cache-k{k}", ignore_errors=True)  # a kept cache would resume: time a full write
        started = time.perf_counter()
        write_cache(load_recipe(work / f"k{k}.yaml"), show_progress=False)
        cache_times[k] = {"seconds": time.perf_counter() - started, "tokens": len(rows) * size.seq}
    return {"rows": len(rows), "cache": cache_times}


# ---- workers (one process per measurement) ---------------------------------------------------


def peak_bytes(device: str) -> int:
    """GPU: peak allocated by torch. CPU: this process's peak RSS (VmHWM; ru_maxrss would carry
    the parent's peak across fork + exec)."""
    import torch

    if device == "cuda":
        return int(torch.cuda.max_memory_allocated())
    status = Path("/proc/self/status")
    if status.is_file():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def worker_engine(work: Path, k: int, variant: str, args: argparse.Namespace) -> dict:
    """variant: online, cache (cache.use) or fused (train.fused_loss)."""
    import torch
    from rich.console import Console

    from merge_distill.engine import setup_run, train_step
    from merge_distill.recipe import load_recipe

    overrides = [f"cache.use={str(variant == 'cache').lower()}", f"train.fused_loss={str(variant == 'fused').lower()}"]
    parts = setup_run(load_recipe(work / f"k{k}.yaml", overrides), overwrite=True, console=Console(file=io.StringIO()))
    sync = torch.cuda.synchronize if args.device == "cuda" else (lambda: None)
    for step in range(args.warmup):
        train_step(parts.training, parts.plan, step)
    sync()
    start = time.perf_counter()
    for step in range(args.warmup, args.warmup + args.steps):
        result = train_step(parts.training, parts.plan, step)
    sync()
    seconds = time.perf_counter() - start
    return {"tokens_per_s": args.steps * args.batch * SIZES[args.size].seq / seconds, "peak_bytes": peak_bytes(args.device),
            "last_loss": result.loss, "threads": torch.get_num_threads()}


def worker_trl(work: Path, args: argparse.Namespace) -> dict:
    """TRL's GKDTrainer, supervised (lmbda = 0: no generation), beta = 0: forward KL, one teacher."""
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl.experimental.gkd import GKDConfig, GKDTrainer

    rows = torch.load(work / "rows.pt")
    n = (args.warmup + args.steps) * args.batch
    dataset = Dataset.from_dict({"input_ids": rows[torch.arange(n) % len(rows)].tolist()})
    stamps: list[float] = []

    class Clock(TrainerCallback):
        def on_step_end(self, *unused, **kwargs):  # noqa: ANN002, ANN003
            if args.device == "cuda":
                torch.cuda.synchronize()
            stamps.append(time.perf_counter())

    def collate(features: list[dict]) -> dict:
        ids = torch.tensor([f["input_ids"] for f in features])
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}

    config = GKDConfig(
        output_dir=str(work / "trl-out"), per_device_train_batch_size=args.batch, max_steps=args.warmup + args.steps,
        learning_rate=1e-3, lr_scheduler_type="constant", weight_decay=0.0, max_grad_norm=0.0, lmbda=0.0, beta=0.0,
        temperature=1.0, seq_kd=False, max_length=SIZES[args.size].seq, logging_steps=10**6, save_strategy="no",
        report_to=[], gradient_checkpointing=False, bf16=args.precision == "bf16", fp16=False, dataloader_num_workers=0,
        disable_dropout=True, use_cpu=args.device == "cpu", optim="adamw_torch", seed=0)
    teacher_dtype = torch.bfloat16 if args.precision == "bf16" else torch.float32  # as the engine loads teachers
    trainer = GKDTrainer(
        model=AutoModelForCausalLM.from_pretrained(work / "student"),
        teacher_model=AutoModelForCausalLM.from_pretrained(work / "teacher0", dtype=teacher_dtype),
        args=config, train_dataset=dataset, data_collator=collate,
        processing_class=AutoTokenizer.from_pretrained(work / "tokenizer"), callbacks=[Clock()])
    trainer.train()
    seconds = stamps[-1] - stamps[args.warmup - 1]
    return {"tokens_per_s": args.steps * args.batch * SIZES[args.size].seq / seconds, "peak_bytes": peak_bytes(args.device),
            "threads": torch.get_num_threads()}


def run_worker(variant: str, k: int, args: argparse.Namespace) -> dict:
    """Start one measurement in a fresh process; returns its JSON line."""
    common = ["--threads", str(args.threads), "--device", args.device, "--batch", str(args.batch),
              "--warmup", str(args.warmup), "--steps", str(args.steps),
              *(["--precision", args.precision] if args.precision != "fp32" else [])]
    if variant in ("floor", "floor_chunked"):
        cmd = [sys.executable, str(ROOT / "tools" / "bench_floor.py"), "--teachers",
               *(str(args.work / f"teacher{i}") for i in range(k)), "--student", str(args.work / "student"),
               "--rows", str(args.work / "rows.pt"), "--vocab-size", str(SIZES[args.size].vocab), *common,
               *(["--chunk-tokens", "1024"] if variant == "floor_chunked" else [])]
    elif variant == "baseline":  # the online engine of another checkout (--baseline), on the same assets
        cmd = [sys.executable, str(args.baseline / "tools" / "bench.py"), "--worker", "online", "--k", str(k),
               "--work", str(args.work), *common]
    else:
        cmd = [sys.executable, __file__, "--worker", variant, "--k", str(k), "--work", str(args.work), "--size", args.size,
               *common]
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": str(args.threads)}
    if not args.default_malloc:
        env.update(STEADY_MALLOC)
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=1800)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode or not lines:
        raise RuntimeError(f"{variant} K={k} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1])


# ---- orchestration --------------------------------------------------------------------------


def table(results: dict, assets: dict) -> str:
    med = {key: statistics.median(r["tokens_per_s"] for r in runs) for key, runs in results.items()}
    peak = {key: max(r["peak_bytes"] for r in runs) / 2**20 for key, runs in results.items()}
    floors = ("floor", "floor_chunked")
    out = ["| K | floor tok/s | chunked floor tok/s | online tok/s | online / faster floor | cache tok/s | cache / online "
           "| peak MiB floor / chunked floor / online / cache |",
           "|---|---:|---:|---:|---:|---:|---:|---|"]
    for k in sorted({k for _, k in med}):
        f, fc, o, c = (med.get((v, k), math.nan) for v in (*floors, "online", "cache"))
        faster = max((x for x in (f, fc) if not math.isnan(x)), default=math.nan)
        peaks = " / ".join(f"{peak.get((v, k), math.nan):,.0f}" for v in (*floors, "online", "cache"))
        out.append(f"| {k} | {f:,.0f} | {fc:,.0f} | {o:,.0f} | {o / faster:.2f} | {c:,.0f} | {c / o:.2f} | {peaks} |")
    for k in sorted({k for v, k in med if v == "fused"}):
        fu, o = med[("fused", k)], med.get(("online", k), math.nan)
        out.append(f"fused (train.fused_loss), K = {k}: {fu:,.0f} tok/s, {fu / o:.2f} x online; "
                   f"peak {peak[('fused', k)]:,.0f} MiB (online {peak.get(('online', k), math.nan):,.0f})")
    if ("trl", 1) in med:
        t = med[("trl", 1)]
        faster = max(med.get((v, 1), 0.0) for v in floors)
        out.append(f"\nTRL GKDTrainer (K = 1, lmbda 0, beta 0 = forward KL): {t:,.0f} tok/s, {t / faster:.2f} x the "
                   f"faster floor, {t / med[('online', 1)]:.2f} x merge_distill online; peak {peak[('trl', 1)]:,.0f} MiB")
    for k in sorted({k for v, k in med if v == "baseline"}):
        b, o = med[("baseline", k)], med.get(("online", k), math.nan)
        out.append(f"online vs baseline checkout, K = {k}: {o:,.0f} vs {b:,.0f} tok/s ({o / b:.3f} x); "
                   f"peak {peak.get(('online', k), math.nan):,.0f} vs {peak[('baseline', k)]:,.0f} MiB")
    for k, c in sorted(assets["cache"].items()):
        out.append(f"cache write K = {k}: {c['tokens'] / c['seconds']:,.0f} tok/s ({c['tokens']} tokens, {c['seconds']:.1f} s)")
        train = med.get(("cache", int(k)))
        if train:  # n runs over the cached tokens, the one write included: n * tokens / (write + n * tokens / train)
            combined = [n * c["tokens"] / (c["seconds"] + n * c["tokens"] / train) for n in (1, 3, 10)]
            out.append(f"  cache with its writing, K = {k}, over 1 / 3 / 10 runs of the same data: "
                       f"{' / '.join(f'{x:,.0f}' for x in combined)} tok/s (training only {train:,.0f}; online "
                       f"{med.get(('online', int(k)), math.nan):,.0f})")
    spread = {f"{v}-k{k}": [round(r["tokens_per_s"]) for r in runs] for (v, k), runs in results.items()}
    out.append(f"all runs (tok/s): {json.dumps(spread)}")
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, help="assets folder (default /tmp/merge_distill_bench, or "
                        "/tmp/merge_distill_bench-SIZE for the GPU sizes)")
    parser.add_argument("--size", default="tiny", choices=sorted(SIZES), help="the workload's shapes (see above)")
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (1: see docs/PERFORMANCE.md)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--no-trl", action="store_true", help="skip the TRL row")
    parser.add_argument("--default-malloc", action="store_true", help="do not set STEADY_MALLOC in the workers")
    parser.add_argument("--variants", default="floor,floor_chunked,online,cache",
                        help="comma-separated subset of floor,floor_chunked,online,cache,fused")
    parser.add_argument("--ks", default="1,2,3", help="comma-separated teacher counts")
    parser.add_argument("--reuse", action="store_true", help="reuse the assets and caches already in --work")
    parser.add_argument("--quick", action="store_true", help="1 rep of 2 steps: checks that everything runs")
    parser.add_argument("--out", type=Path, help="also write the raw results as JSON here")
    parser.add_argument("--baseline", type=Path, help="another checkout of merge_distill (e.g. a git worktree of an "
                        "older commit): its online engine runs interleaved with this one's, same assets")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--k", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.work = args.work or Path("/tmp/merge_distill_bench" + ("" if args.size == "tiny" else f"-{args.size}"))
    if args.quick:
        args.reps, args.steps, args.warmup = 1, 2, 1
    if args.worker:  # torch is imported in workers only: the parent stays small (see peak_bytes)
        import torch

        torch.set_num_threads(args.threads)
        if args.worker == "assets":
            result = build_assets(args.work, args)
        elif args.worker == "trl":
            result = worker_trl(args.work, args)
        else:
            result = worker_engine(args.work, args.k, args.worker, args)
        print(json.dumps(result))
        return
    if args.reuse and (args.work / "assets.json").is_file():
        assets = json.loads((args.work / "assets.json").read_text())
    else:
        print(f"building assets and writing the caches in {args.work} ...", flush=True)
        assets = run_worker("assets", 0, args)
        (args.work / "assets.json").write_text(json.dumps(assets))
    ks = [int(k) for k in args.ks.split(",")]
    variants = [(v, k) for k in ks for v in args.variants.split(",")]
    if args.baseline is not None:
        variants += [("baseline", k) for k in ks]
    if not args.no_trl and 1 in ks:
        if importlib.util.find_spec("trl") is None:
            print("trl is not installed (pip install -e '.[bench]'): no TRL row", flush=True)
        else:
            variants.append(("trl", 1))
    results: dict = {key: [] for key in variants}
    for rep in range(args.reps):
        for variant, k in variants:
            results[(variant, k)].append(run_worker(variant, k, args))
            print(f"rep {rep + 1} {variant:>6} K={k}: {results[(variant, k)][-1]['tokens_per_s']:,.0f} tok/s", flush=True)
    text = table(results, assets)
    malloc = "default malloc" if args.default_malloc else "steady malloc"
    size = "" if args.size == "tiny" else f"size {args.size} (V = {SIZES[args.size].vocab:,}), {args.precision}, "
    print(f"\n{args.device}, {size}{args.threads} thread(s), {malloc}, batch {args.batch} x {SIZES[args.size].seq}, "
          f"{args.steps} timed steps after {args.warmup}, median of {args.reps}\n{text}")
    if args.out:
        args.out.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "assets": assets,
                                        "runs": {f"{v}-k{k}": r for (v, k), r in results.items()}}, indent=1))


if __name__ == "__main__":
    main()
