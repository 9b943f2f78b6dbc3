"""Every phase through the teacher source, under 2 processes (gloo, DeepSpeed ZeRO-3 teachers).

One launch of tests/distributed/_phases_worker.py trains (learned router), writes the teacher
cache and evaluates; the same worker in one process is the reference. Checked:
- in training, end-of-run evaluation, cache writing and `eval`, each process holds 0.50 of
  every teacher's parameter bytes (zero3_param_persistence_threshold 0: nothing kept whole);
- evaluation NLL equals one process within 1e-6 relative (sums reduced over processes);
- the cache holds the same rows: every source row, every teacher, ids equal, values within 1e-5;
- the learned gate's gradient at each of 3 steps, and its weights after them, equal one process
  with the same global batch (its gradient is summed over processes exactly once).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import pico_recipe_dict, write_recipe
from merge_distill import distributed as d
from merge_distill.cache.manifest import read_manifest
from merge_distill.cache.reader import TeacherCache

REPO = Path(__file__).resolve().parents[2]
WORKER = Path(__file__).with_name("_phases_worker.py")


def launch(recipe: Path, out: Path, nproc: int) -> list[dict]:
    out.mkdir()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "tests")]), "OMP_NUM_THREADS": "1",
           "CUDA_VISIBLE_DEVICES": "", "TOKENIZERS_PARALLELISM": "false",
           "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])}
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    for _attempt in range(2):  # a free port can be taken between finding and binding it: retry once
        prefix = d.launcher_prefix(nproc, launcher="torchrun", master_port=d._free_port()) if nproc > 1 else [sys.executable]
        proc = subprocess.run(prefix + [str(WORKER), str(recipe), str(out)], cwd=REPO, env=env,
                              capture_output=True, text=True, timeout=900)
        if proc.returncode == 0 or "address already in use" not in (proc.stdout + proc.stderr).lower():
            break
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(nproc)]


@pytest.fixture(scope="module")
def phases(pico, tmp_path_factory) -> dict:
    """{1: rank reports of one process, 2: of two, "dirs": {1: out dir, 2: out dir}}."""
    tmp = tmp_path_factory.mktemp("phases")
    recipe = pico_recipe_dict(pico, tmp / "unused")
    recipe["data"]["train"][0]["max_examples"] = 6
    recipe["data"]["train"][1]["max_examples"] = 6
    recipe["data"]["eval"] = [{"type": "jsonl", "path": str(pico["code"]), "domain": "code", "max_examples": 4},
                              {"type": "jsonl", "path": str(pico["prose"]), "domain": "prose", "max_examples": 4}]
    recipe["routing"] = {"kind": "learned", "lr": 0.05}
    recipe["train"].update(steps=3, micro_batch_size=2, lr=5e-3, schedule="constant", max_grad_norm=None)
    recipe["cache"] = {"dir": str(tmp / "unused-cache"), "k": 16, "dtype": "float32", "rows_per_shard": 4, "store": "topk"}
    recipe["distributed"] = {"zero3_param_persistence_threshold": 0}
    two = write_recipe(tmp / "two.yaml", recipe)
    recipe["train"]["micro_batch_size"] = 4  # one process, the same global batch
    one = write_recipe(tmp / "one.yaml", recipe)
    return {1: launch(one, tmp / "one", 1), 2: launch(two, tmp / "two", 2), "dirs": {1: tmp / "one", 2: tmp / "two"}}


def test_each_process_holds_half_of_every_teacher_in_every_phase(phases) -> None:
    for rank, report in enumerate(phases[2]):
        assert report["world"]["world_size"] == 2 and report["world"]["rank"] == rank
        assert set(report["held"]) == {"train", "cache", "eval"}
        assert len(report["held"]["train"]) == 2  # the training source and the end-of-run evaluation's
        for phase, opened in report["held"].items():
            for shares in opened:
                assert shares == pytest.approx([0.5, 0.5], abs=0.01), (rank, phase, shares)
    for phase, opened in phases[1][0]["held"].items():
        assert all(shares == [1.0, 1.0] for shares in opened), phase  # one process holds whole teachers


def test_evaluation_equals_one_process(phases) -> None:
    one, two = phases[1][0]["eval"], phases[2][0]["eval"]
    assert phases[2][1]["eval"] == two  # every process returns the reduced result
    assert [r["model"] for r in two["rows"]] == ["student", "code", "prose"]
    for row_one, row_two in zip(one["rows"], two["rows"]):
        assert row_one["tokens"] == row_two["tokens"]
        for domain in one["domains"]:
            assert row_two["nll"][domain] == pytest.approx(row_one["nll"][domain], rel=1e-6), (row_two["model"], domain)


def test_cache_rows_equal_one_process(phases) -> None:
    caches = {}
    for n in (1, 2):
        root = phases["dirs"][n] / "cache"
        manifest = read_manifest(root)
        assert manifest is not None and manifest["complete"]
        caches[n] = TeacherCache(root, manifest)
    shards = {n: sorted(p.name for p in Path(caches[n].root).glob("sources/*/shard-*")) for n in (1, 2)}
    assert shards[1] == shards[2] and len(shards[2]) >= 2  # disjoint shards, dealt over both processes
    for label, entry in caches[1].sources.items():
        rows = list(range(entry["rows"]))
        a, b = caches[1].read([label] * len(rows), rows), caches[2].read([label] * len(rows), rows)
        for field in ("ids", "values", "tail", "nll", "entropy"):
            for j in range(2):
                if field == "ids":
                    assert torch.equal(a[field][j], b[field][j]), (label, j)
                else:
                    assert torch.allclose(a[field][j], b[field][j], atol=1e-5, rtol=1e-5), (label, field, j)


def test_learned_gate_equals_one_process_with_the_same_global_batch(phases) -> None:
    # The gradient itself: Adam is nearly blind to a constant factor, so a gradient divided by
    # the world size twice (the old bug) would still train to almost the same weights.
    grads = {n: phases[n][0]["gate_grads"] for n in (1, 2)}
    assert len(grads[1]) == len(grads[2]) == 3
    assert phases[2][1]["gate_grads"] == grads[2]  # every process steps with the same summed gradient
    for step_one, step_two in zip(grads[1], grads[2]):
        for key in step_one:
            a, b = torch.tensor(step_one[key]), torch.tensor(step_two[key])
            assert a.abs().max() > 1e-4
            assert torch.allclose(b, a, rtol=1e-4, atol=1e-7), (key, (b / a).nanmean())
    one, two = phases[1][0]["gate"], phases[2][0]["gate"]
    moved = max(abs(v) for row in one["gate.weight"] for v in row)
    assert moved > 1e-3, "the gate trained"
    for key in one:
        assert torch.allclose(torch.tensor(two[key]), torch.tensor(one[key]), rtol=1e-4, atol=1e-6), key
