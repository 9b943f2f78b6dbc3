"""Exact resume: a run killed at a random step and resumed ends bitwise equal to one never stopped.

The reference run is in-process; the interrupted runs are real `python -m merge_distill.cli run`
processes, killed with SIGKILL (no chance to clean up) or stopped with SIGTERM (checkpoint, exit
143). Damaged checkpoints make resume fall back to the previous complete one.
"""

from __future__ import annotations

import io
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from rich.console import Console
from safetensors.torch import load_file

from conftest import pico_recipe_dict, run_cli, write_recipe
from merge_distill.checkpoint import LATEST, list_checkpoints, step_name, verify
from merge_distill.engine import run
from merge_distill.errors import UserError
from merge_distill.recipe import load_recipe

STEPS = 8


def resume_recipe(pico, folder: Path, steps: int = STEPS, keep_last: int = 2) -> Path:
    """The pico recipe with a checkpoint after every step (run dir: folder/run)."""
    folder.mkdir(parents=True, exist_ok=True)
    recipe = pico_recipe_dict(
        pico, folder / "run",
        train={"steps": steps, "micro_batch_size": 2, "grad_accum": 2, "lr": 1e-3, "seed": 0, "log_every": 1},
        output={"dir": str(folder / "run"), "save_every": 1, "keep_last": keep_last},
    )
    recipe["routing"] = {"kind": "learned", "lr": 1e-2}  # router state and its optimizer must resume too
    return write_recipe(folder / "recipe.yaml", recipe)


def weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run_dir / "student" / "model.safetensors"))


def losses(run_dir: Path) -> list[tuple[int, float]]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"]) for r in rows]


def assert_same_run(run_dir: Path, reference: Path) -> None:
    got, want = weights(run_dir), weights(reference)
    assert got.keys() == want.keys()
    for name in want:
        assert torch.equal(got[name], want[name]), f"{name} differs after resume"
    assert losses(run_dir) == losses(reference)
    assert [s for s, _ in losses(run_dir)] == list(range(1, STEPS + 1))
    router_a = load_file(str(run_dir / "router.safetensors"))
    router_b = load_file(str(reference / "router.safetensors"))
    assert all(torch.equal(router_a[k], router_b[k]) for k in router_b)
    stats_a = json.loads((run_dir / "stats.json").read_text())
    stats_b = json.loads((reference / "stats.json").read_text())
    assert stats_a["tokens"] == stats_b["tokens"]
    for teacher, figures in stats_b["overall"].items():
        resumed = stats_a["overall"][teacher]
        assert {k for k, v in resumed.items() if v is None} == {k for k, v in figures.items() if v is None}
        numbers = {k: v for k, v in figures.items() if v is not None}
        assert {k: resumed[k] for k in numbers} == pytest.approx(numbers, rel=1e-9)  # float64 sums, other order


@pytest.fixture(scope="module")
def reference(pico, tmp_path_factory) -> Path:
    """The recipe trained without interruption (in this process); keeps checkpoints of the last 3 steps."""
    run_dir = run(load_recipe(resume_recipe(pico, tmp_path_factory.mktemp("reference"), keep_last=3)), console=quiet())
    assert [s for s, _ in list_checkpoints(run_dir)] == [STEPS, STEPS - 1, STEPS - 2]
    return run_dir


def quiet() -> Console:
    return Console(file=io.StringIO(), width=200)


def cli_env() -> dict[str, str]:
    # Same intra-op thread count as this process: float reductions then add in the same order.
    path = os.pathsep.join(filter(None, [str(Path(__file__).parents[1]), os.environ.get("PYTHONPATH")]))
    return {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads()), "PYTHONPATH": path}


def start_cli(recipe: Path, *args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "merge_distill.cli", "run", str(recipe), "--no-color", *args],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=cli_env())


def wait_for_rows(proc: subprocess.Popen, metrics: Path, rows: int, timeout: float = 240.0) -> None:
    """Poll metrics.jsonl until it has `rows` lines (the process is then around step `rows`)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if metrics.is_file() and metrics.read_text().count("\n") >= rows:
            return
        if proc.poll() is not None:
            pytest.fail(f"the run ended before step {rows}: {proc.stderr.read()}")
        time.sleep(0.002)
    proc.kill()
    pytest.fail(f"no {rows} metrics rows after {timeout} s")


def test_sigkill_at_random_step_then_resume_is_bitwise_identical(pico, tmp_path, reference, monkeypatch, capsys):
    kill_after = random.Random(20261127).randint(2, STEPS - 3)
    recipe = resume_recipe(pico, tmp_path)
    run_dir = tmp_path / "run"
    proc = start_cli(recipe)
    wait_for_rows(proc, run_dir / "metrics.jsonl", kill_after)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not (run_dir / "student").exists(), "the kill came too late: the run had finished"
    killed_at = len(losses(run_dir)) if (run_dir / "metrics.jsonl").read_text().strip() else 0

    # `merge-distill run RECIPE --resume`, in this process (a second interpreter start costs ~10 s)
    code, out = run_cli(["run", str(recipe), "--resume", "--no-color"], monkeypatch, capsys)
    assert code == 0, out
    resumed_from = int(out.split("resuming from")[1].split("step-")[1][:6])
    assert kill_after - 1 <= resumed_from <= killed_at + 1
    assert_same_run(run_dir, reference)
    facts = json.loads((run_dir / "run.json").read_text())
    assert facts["status"] == "complete" and facts["steps_done"] == STEPS
    assert facts["tokens_seen"] == json.loads((reference / "run.json").read_text())["tokens_seen"]


def test_sigterm_saves_checkpoint_exits_143_and_resumes_exactly(pico, tmp_path, reference):
    recipe = resume_recipe(pico, tmp_path)
    run_dir = tmp_path / "run"
    proc = start_cli(recipe)
    wait_for_rows(proc, run_dir / "metrics.jsonl", 3)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 143, stderr
    assert "interrupted by SIGTERM" in stderr and f"merge-distill run {recipe} --resume" in stderr
    assert "Traceback" not in stderr
    facts = json.loads((run_dir / "run.json").read_text())
    assert facts["status"] == "interrupted"
    newest = int((run_dir / "checkpoints" / LATEST).read_text().strip().removeprefix("step-"))
    assert len(losses(run_dir)) == newest == facts["steps_done"]
    assert verify(run_dir / "checkpoints" / step_name(newest)) is None

    run(load_recipe(recipe), resume=True, console=quiet())
    assert_same_run(run_dir, reference)


def copy_run(pico, finished: Path, folder: Path, keep_last: int = 3) -> tuple[Path, Path, dict[str, torch.Tensor]]:
    """The finished reference run copied to folder/run (a moved run folder resumes): the recipe,
    the run folder, and the final weights."""
    recipe = resume_recipe(pico, folder, keep_last=keep_last)
    shutil.copytree(finished, folder / "run")
    return recipe, folder / "run", weights(finished)


def resume_quietly(recipe: Path, overrides: list[str] = ()) -> str:
    out = io.StringIO()
    run(load_recipe(recipe, list(overrides)), resume=True, console=Console(file=out, width=300))
    return out.getvalue()


def test_truncated_latest_checkpoint_falls_back_to_previous(pico, reference, tmp_path):
    recipe, run_dir, final = copy_run(pico, reference, tmp_path)
    newest = run_dir / "checkpoints" / "step-000008"
    model = newest / "model.safetensors"
    model.write_bytes(model.read_bytes()[:1000])
    shutil.rmtree(run_dir / "student")
    text = resume_quietly(recipe)
    assert "step-000008 is incomplete or damaged: model.safetensors is truncated" in text
    assert "resuming from" in text and "step-000007 (step 7 of 8)" in text
    assert all(torch.equal(final[k], v) for k, v in weights(run_dir).items()), "redoing step 8 gives the same weights"
    assert verify(newest) is None, "step 8 was written again, complete"


def test_damaged_bytes_of_same_size_fall_back(pico, reference, tmp_path):
    recipe, run_dir, final = copy_run(pico, reference, tmp_path)
    model = run_dir / "checkpoints" / "step-000008" / "model.safetensors"
    data = bytearray(model.read_bytes())
    data[:8] = b"\xff" * 8  # the header length: same size, unreadable
    model.write_bytes(bytes(data))
    text = resume_quietly(recipe)
    assert "step-000008 is incomplete or damaged: cannot be loaded" in text and "step-000007" in text
    assert all(torch.equal(final[k], v) for k, v in weights(run_dir).items())


def test_half_written_checkpoint_and_stale_pointer_are_ignored(pico, reference, tmp_path):
    recipe, run_dir, final = copy_run(pico, reference, tmp_path)
    root = run_dir / "checkpoints"
    # A kill during the write of step 5: the temporary folder holds part of the files; a step-5
    # folder without manifest; and `latest` pointing at it (as if written out of order).
    shutil.copytree(root / "step-000008", root / ".tmp-step-000009")
    (root / ".tmp-step-000009" / "manifest.json").unlink()
    shutil.copytree(root / "step-000008", root / "step-000009")
    (root / "step-000009" / "manifest.json").unlink()
    (root / LATEST).write_text("step-000009\n")
    text = resume_quietly(recipe)
    assert "step-000009 is incomplete or damaged: no manifest.json" in text
    assert "step-000008 (step 8 of 8)" in text
    assert not (root / ".tmp-step-000009").exists() and not (root / "step-000009").exists()
    assert (root / LATEST).read_text().strip() == "step-000008"
    assert all(torch.equal(final[k], v) for k, v in weights(run_dir).items())


def test_corrupt_checkpoint_without_fallback_exits_2(pico, reference, tmp_path, monkeypatch, capsys):
    recipe, run_dir, _ = copy_run(pico, reference, tmp_path, keep_last=1)
    for old in ("step-000006", "step-000007"):
        shutil.rmtree(run_dir / "checkpoints" / old)
    (run_dir / "checkpoints" / "step-000008" / "state.json").write_text("{")
    code, text = run_cli(["run", str(recipe), "--resume"], monkeypatch, capsys)
    assert code == 2, text
    assert "no complete checkpoint" in text and "step-000008" in text and "--overwrite" in text
    assert "Traceback" not in text


def test_metrics_cut_to_checkpoint_step(pico, reference, tmp_path):
    recipe, run_dir, _ = copy_run(pico, reference, tmp_path)
    shutil.rmtree(run_dir / "checkpoints" / "step-000008")
    before = losses(run_dir)[:STEPS - 1]
    with open(run_dir / "metrics.jsonl", "a") as fh:
        fh.write('{"step": 9, "loss": 1.0')  # a half-written line from a killed process
    resume_quietly(recipe)
    assert [s for s, _ in losses(run_dir)] == list(range(1, STEPS + 1))
    assert losses(run_dir)[:STEPS - 1] == before


def test_resume_refusals(pico, reference, tmp_path, monkeypatch, capsys):
    recipe, run_dir, _ = copy_run(pico, reference, tmp_path)
    code, text = run_cli(["run", str(recipe)], monkeypatch, capsys)
    assert code == 2 and "pass --resume to continue it, or --overwrite" in text
    code, text = run_cli(["run", str(recipe), "--resume", "train.lr=0.5"], monkeypatch, capsys)
    assert code == 2 and "train.lr: 0.001 in the checkpoint, 0.5 now" in text
    code, text = run_cli(["run", str(recipe), "--resume", "--overwrite"], monkeypatch, capsys)
    assert code == 2 and "contradict" in text
    assert (run_dir / "checkpoints" / "step-000008").is_dir(), "refusals change nothing"
    text = resume_quietly(recipe, ["train.log_every=3", "train.on_nonfinite=skip"])
    assert "resuming from" in text, "keys that do not change the numbers may change"


def test_resume_without_checkpoint_is_refused(make_recipe):
    with pytest.raises(UserError, match="holds no run to resume"):
        run(load_recipe(make_recipe()), resume=True, console=quiet())


def test_a_key_added_since_the_checkpoint_counts_as_its_default(make_recipe):
    """A checkpoint written before a recipe section existed (no `onpolicy`, no train.fused_loss)
    resumes under today's schema, whose defaults change nothing; a changed value still refuses."""
    from merge_distill.checkpoint import recipe_differences

    current = load_recipe(make_recipe()).model_dump(mode="json")
    older = {k: v for k, v in current.items() if k != "onpolicy"}
    older["train"] = {k: v for k, v in current["train"].items() if k != "fused_loss"}
    assert recipe_differences(older, current) == []
    older["train"]["lr"] = 0.5
    assert recipe_differences(older, current) == [f"train.lr: 0.5 in the checkpoint, {current['train']['lr']!r} now"]
