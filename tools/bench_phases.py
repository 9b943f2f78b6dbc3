"""Where a step of the tools/bench.py workload spends its time: wall ms per step by phase.

Wraps the engine's calls (student forward, teacher signals, loss driver, agreement, backward,
clipping, optimizer step) with timers and runs `--steps` steps after 2 warm-up steps, in this
process, on the assets that `python tools/bench.py` built in `--work` (run it first; its
recipes hold warmup + steps of data, so use `--steps` at most 8 with its defaults). Phases
nest (forward_micro holds the student forward, signals and loss), so they do not add up.

    python tools/bench_phases.py --k 3 --cache        # from the teacher cache
    python tools/bench_phases.py --k 3                # online: the teachers run every step

For a per-operator view, run the same under `py-spy record -o profile.svg -- python ...` or
`--torch-profile`, which prints torch.profiler's table of the timed steps.
"""

from __future__ import annotations

import argparse
import collections
import io
import sys
import time
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def timed(owner: Any, name: str, label: str, totals: dict[str, float]) -> None:
    """Replace owner.name by a wrapper that adds its wall time to totals[label]."""
    inner: Callable = getattr(owner, name)

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        try:
            return inner(*args, **kwargs)
        finally:
            totals[label] += time.perf_counter() - start

    setattr(owner, name, wrapper)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path("/tmp/merge_distill_bench"))
    parser.add_argument("--k", type=int, default=3, choices=[1, 2, 3])
    parser.add_argument("--cache", action="store_true", help="train from the teacher cache")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--torch-profile", action="store_true", help="also print torch.profiler's operator table")
    args = parser.parse_args()

    import torch
    from rich.console import Console

    import merge_distill.engine as engine
    import merge_distill.sources.signals as signals
    from merge_distill.engine import setup_run
    from merge_distill.recipe import load_recipe

    torch.set_num_threads(args.threads)
    recipe = load_recipe(args.work / f"k{args.k}.yaml", [f"cache.use={str(args.cache).lower()}"])
    parts = setup_run(recipe, overwrite=True, console=Console(file=io.StringIO()))
    totals: dict[str, float] = collections.defaultdict(float)
    timed(parts.training.student, "forward", "student forward", totals)
    timed(parts.training.source, "signals", "teacher signals", totals)
    timed(engine, "forward_micro", "forward_micro", totals)
    timed(signals, "sparse_distill_loss" if args.cache else "distill_loss", "loss driver", totals)
    timed(signals.SparseSignals if args.cache else signals.DenseSignals, "agreement", "agreement", totals)
    timed(parts.training.accelerator, "backward", "backward", totals)
    timed(parts.training.accelerator, "clip_grad_norm_", "clip", totals)
    timed(parts.training.optimizer, "step", "optimizer step", totals)
    for step in range(2):
        engine.train_step(parts.training, parts.plan, step)
    totals.clear()
    profiler = torch.profiler.profile() if args.torch_profile else None
    if profiler is not None:
        profiler.__enter__()
    start = time.perf_counter()
    for step in range(2, 2 + args.steps):
        engine.train_step(parts.training, parts.plan, step)
    seconds = time.perf_counter() - start
    if profiler is not None:
        profiler.__exit__(None, None, None)
    tokens = args.steps * recipe.train.micro_batch_size * recipe.data.seq_len
    source = "cache" if args.cache else "online"
    print(f"K = {args.k}, {source}: {seconds / args.steps * 1e3:.1f} ms/step, {tokens / seconds:,.0f} tok/s")
    for label, total in sorted(totals.items(), key=lambda item: -item[1]):
        print(f"  {label:16s} {total / args.steps * 1e3:7.1f} ms/step")
    if profiler is not None:
        print(profiler.key_averages().table(sort_by="self_cpu_time_total", row_limit=20))


if __name__ == "__main__":
    main()
