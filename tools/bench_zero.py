"""Resident teacher weights per process: 1 process (plain), 1 process (ZeRO-3), 2 processes (ZeRO-3).

    .venv/bin/python tools/bench_zero.py [--hidden 768 --layers 12 --vocab 32000 --dtype fp32]

Builds a random-init Llama teacher (default about 110M parameters, tied embeddings) with the
project's own functions: inside `teacher_init_context` (so under ZeRO-3 no process ever holds
the whole model) and through `prepare_teacher`, runs one forward, and reports per process the
bytes of teacher parameters it keeps (its ZeRO-3 partitions plus the small tensors kept whole)
and its resident set size. Runs on CPU (gloo) or GPUs alike; the 2-process case goes through
`torchrun`, launched by this script.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def worker(args: argparse.Namespace) -> None:
    import psutil
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    from merge_distill import distributed as d

    dist = d.DistributedConfig(use_deepspeed=args.mode, teacher_zero_stage=3)
    acc = d.make_accelerator(dist, "fp32" if args.dtype == "fp32" else args.dtype, 1, 1.0, 1)
    dtype = getattr(torch, DTYPES[args.dtype])
    cfg = LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.hidden * 8 // 3,
                      num_hidden_layers=args.layers, num_attention_heads=args.hidden // 64,
                      num_key_value_heads=args.hidden // 64, tie_word_embeddings=True)
    torch.manual_seed(0)
    with d.teacher_init_context(acc, dist, dtype):
        teacher = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    teacher = d.prepare_teacher(acc, dist, teacher)
    gc.collect()
    ids = torch.randint(0, args.vocab, (1, 128), device=acc.device)
    t0 = time.perf_counter()
    with torch.inference_mode():
        teacher(input_ids=ids)
    forward_s = time.perf_counter() - t0
    held, total = d.held_parameter_bytes(teacher)
    info = d.world_info()
    row = {"processes": info["world_size"], "rank": info["rank"], "deepspeed": d.uses_deepspeed(acc),
           "params": total // dtype.itemsize, "held_bytes": held, "rss_bytes": psutil.Process().memory_info().rss,
           "forward_s": forward_s, "device": str(acc.device)}
    Path(args.out, f"{args.tag}_rank{info['rank']}.json").write_text(json.dumps(row))
    acc.wait_for_everyone()


def launch(args: argparse.Namespace, out: str, tag: str, nproc: int, mode: str) -> None:
    from merge_distill.distributed import _free_port, launcher_prefix

    me = [str(Path(__file__).resolve()), "--worker", "--out", out, "--tag", tag, "--mode", mode,
          "--hidden", str(args.hidden), "--layers", str(args.layers), "--vocab", str(args.vocab),
          "--dtype", args.dtype]
    cmd = [sys.executable, *me] if nproc == 1 else launcher_prefix(nproc, launcher="torchrun",
                                                                    master_port=_free_port()) + me
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
           "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])}
    env.setdefault("OMP_NUM_THREADS", "1")
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"):
        env.pop(k, None)
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed:\n{proc.stderr[-4000:]}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--hidden", type=int, default=768)
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--dtype", choices=list(DTYPES), default="fp32")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    p.add_argument("--tag", help=argparse.SUPPRESS)
    p.add_argument("--mode", default="never", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        worker(args)
        return
    from rich.console import Console
    from rich.table import Table

    runs = [("plain", 1, "never"), ("zero3", 1, "always"), ("zero3", 2, "always")]
    with tempfile.TemporaryDirectory() as out:
        for tag, nproc, mode in runs:
            launch(args, out, f"{tag}{nproc}", nproc, mode)
        rows = [json.loads(f.read_text()) for f in sorted(Path(out).glob("*.json"))]
    rows.sort(key=lambda r: (r["processes"], r["deepspeed"], r["rank"]))
    base = next(r["held_bytes"] for r in rows if not r["deepspeed"])
    table = Table(title=f"teacher: Llama hidden {args.hidden}, {args.layers} layers, vocab {args.vocab}, "
                        f"{rows[0]['params'] / 1e6:.1f}M params, {args.dtype}, {rows[0]['device']}")
    for col in ("processes", "rank", "mode", "teacher bytes held", "vs 1 process", "RSS", "forward (s)"):
        table.add_column(col, justify="right")
    for r in rows:
        table.add_row(str(r["processes"]), str(r["rank"]), "ZeRO-3" if r["deepspeed"] else "plain",
                      f"{r['held_bytes'] / 2**20:,.1f} MiB", f"{r['held_bytes'] / base:.3f}",
                      f"{r['rss_bytes'] / 2**20:,.0f} MiB", f"{r['forward_s']:.2f}")
    Console(width=120).print(table)


if __name__ == "__main__":
    main()
