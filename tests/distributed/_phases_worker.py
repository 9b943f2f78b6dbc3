"""Worker for test_phases.py: training, `merge-distill cache` and evaluation on one launch.

Run as `python -m torch.distributed.run --nproc_per_node N tests/distributed/_phases_worker.py
RECIPE OUT` (or plainly for one process). Each phase gets its teachers from the teacher source;
the worker records, per phase and teacher, the fraction of the teacher's parameter bytes this
process holds, the learned gate's gradient at every step (after the sum over processes) and its
weights after training, and the evaluation result.
Writes OUT/rank<r>.json.
"""

from __future__ import annotations

import io
import json
import sys
from pathlib import Path

import torch
from rich.console import Console
from safetensors.torch import load_file

import merge_distill.cache.writer as writer
import merge_distill.engine as engine
import merge_distill.evaluate as evaluate
from merge_distill import distributed as d
from merge_distill.engine import run
from merge_distill.recipe import load_recipe
from merge_distill.sources import OnlineTeachers

held: dict[str, list[list[float]]] = {}  # phase -> one list of per-teacher shares per source opened
phase = "train"
real_open = OnlineTeachers.open.__func__  # type: ignore[attr-defined]


def recording_open(cls, *args, **kwargs):
    """OnlineTeachers.open, noting what share of each teacher this process holds."""
    source = real_open(cls, *args, **kwargs)
    held.setdefault(phase, []).append([mine / whole for mine, whole in source.held_bytes()])
    return source


gate_grads: list[dict[str, list]] = []  # the learned gate's gradient of each step, as the optimizer sees it
real_sum_gradients = engine.sum_gradients


def recording_sum_gradients(training, module) -> None:
    real_sum_gradients(training, module)
    gate_grads.append({name: p.grad.tolist() for name, p in module.named_parameters()})


def main() -> None:
    global phase
    recipe_path, out = Path(sys.argv[1]), Path(sys.argv[2])
    torch.set_num_threads(1)
    OnlineTeachers.open = classmethod(recording_open)  # type: ignore[method-assign]
    engine.sum_gradients = recording_sum_gradients
    quiet = Console(file=io.StringIO())
    recipe = load_recipe(recipe_path, [f"output.dir={out / 'run'}", f"cache.dir={out / 'cache'}", "cache.use=false"])
    run_dir = run(recipe, overwrite=True, console=quiet)  # training, then the end-of-run evaluation
    gate = {k: v.tolist() for k, v in load_file(str(run_dir / "router.safetensors")).items()}
    phase = "cache"
    writer.write_cache(recipe, console=quiet, show_progress=False)
    phase = "eval"
    accelerator = d.accelerator_for(recipe)
    student, tokenizer = evaluate.load_saved_student(recipe, accelerator, run_dir / "student")
    result = evaluate.evaluate_run(recipe, accelerator, student, tokenizer)
    rank = d.world_info()["rank"]
    (out / f"rank{rank}.json").write_text(json.dumps({"held": held, "gate": gate, "gate_grads": gate_grads, "eval": result,
                                                       "world": d.world_info()}))


if __name__ == "__main__":
    main()
