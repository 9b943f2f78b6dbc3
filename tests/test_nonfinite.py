"""NaN/inf in teacher log-probs, the loss or the gradients: caught on the step it appears.

stop: a one-line error naming the step, the teacher or tensor and the batch's sources, exit 1.
skip: no update of student, router or statistics; the step is counted in run.json.
"""

from __future__ import annotations

import io
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from rich.console import Console
from safetensors.torch import load_file, save_file

from conftest import run_cli
from merge_distill import engine
from merge_distill.engine import run, train_step
from merge_distill.recipe import load_recipe
from merge_distill.engine import setup_run
from merge_distill.errors import NonFiniteError


@pytest.fixture
def nan_teacher(pico, tmp_path) -> Path:
    """A copy of teacher_b with one NaN in lm_head: every position's log-probs become NaN."""
    folder = tmp_path / "nan_teacher"
    shutil.copytree(pico["teacher_b"], folder)
    weights = load_file(str(folder / "model.safetensors"))
    weights["lm_head.weight"][5, 0] = float("nan")
    save_file(weights, str(folder / "model.safetensors"), metadata={"format": "pt"})
    return folder


def params(parts) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in engine.dist_mod.unwrap(parts.training.accelerator, parts.training.student).state_dict().items()}


def test_nan_teacher_stop_exits_1_with_step_teacher_and_sources(make_recipe, nan_teacher, monkeypatch, capsys, tmp_path):
    recipe = make_recipe(train={"steps": 2, "micro_batch_size": 2, "lr": 1e-3, "on_nonfinite": "stop"})
    code, text = run_cli(["run", str(recipe), f"teachers.1.model={nan_teacher}"], monkeypatch, capsys)
    assert code == 1, text
    assert "Traceback" not in text
    assert "error: step 1: teacher 'prose' produced NaN/inf log-probabilities (sources: " in text
    assert "train.on_nonfinite: stop" in text and "--resume train.on_nonfinite=skip" in text
    run_dir = tmp_path / "run"
    assert json.loads((run_dir / "run.json").read_text())["status"] == "failed"
    assert not (run_dir / "student").exists() and (run_dir / "metrics.jsonl").read_text() == ""
    assert (run_dir / "checkpoints" / "step-000000").is_dir(), "the state before the bad step, to resume with skip"


def test_nan_teacher_skip_counts_steps_and_changes_nothing(pico, make_recipe, nan_teacher):
    recipe = load_recipe(make_recipe(train={"steps": 2, "micro_batch_size": 2, "lr": 1e-3, "on_nonfinite": "skip"}),
                         [f"teachers.1.model={nan_teacher}"])
    out = io.StringIO()
    run_dir = run(recipe, console=Console(file=out, width=300))
    facts = json.loads((run_dir / "run.json").read_text())
    assert facts["status"] == "complete" and facts["skipped_steps"] == 2 and facts["tokens_seen"] == 0
    assert "skipped step 1: teacher 'prose' produced NaN/inf" in out.getvalue()
    assert (run_dir / "metrics.jsonl").read_text() == "", "never a metrics row for a skipped step"
    assert json.loads((run_dir / "stats.json").read_text())["tokens"] == 0
    initial = load_file(str(pico["student"] / "model.safetensors"))
    trained = load_file(str(run_dir / "student" / "model.safetensors"))
    assert all(torch.equal(initial[k], trained[k]) for k in initial), "a skipped step never updates the student"
    assert json.loads((run_dir / "report.json").read_text())["run"]["skipped_steps"] == 2


def test_under_deepspeed_a_nan_teacher_is_skipped_before_any_backward(pico, make_recipe, nan_teacher):
    """DeepSpeed accumulates inside its engine from the first backward: a NaN found in the first
    micro-batch's forward touches nothing, so `skip` skips it as without DeepSpeed."""
    recipe = make_recipe(train={"steps": 2, "micro_batch_size": 2, "lr": 1e-3, "on_nonfinite": "skip"})
    # its own process: DeepSpeed's process group and accelerate's state stay out of this one
    done = subprocess.run([sys.executable, "-m", "merge_distill.cli", "run", str(recipe), f"teachers.1.model={nan_teacher}",
                           "distributed.use_deepspeed=always", "distributed.student_zero_stage=2", "--no-color"],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    run_dir = Path(load_recipe(recipe).output.dir)
    facts = json.loads((run_dir / "run.json").read_text())
    assert facts["status"] == "complete" and facts["skipped_steps"] == 2, done.stdout[-2000:]
    assert "skipped step 1: teacher 'prose' produced NaN/inf" in " ".join(done.stdout.split())
    initial = load_file(str(pico["student"] / "model.safetensors"))
    trained = load_file(str(run_dir / "student" / "model.safetensors"))
    assert all(torch.equal(initial[k], trained[k]) for k in initial), "a skipped step never updates the student"


def test_nan_loss_from_the_student_is_caught(make_recipe):
    parts = setup_run(load_recipe(make_recipe()))
    student = engine.dist_mod.unwrap(parts.training.accelerator, parts.training.student)
    with torch.no_grad():
        student.lm_head.weight[3, 0] = float("nan")
    before, stats_before = params(parts), parts.recorder.stats.state_dict()
    result = train_step(parts.training, parts.plan, 0)
    assert result.skipped and result.problems[0].startswith("the loss is NaN/inf (sources: ")
    assert parts.recorder.stats.state_dict() == stats_before, "a skipped step adds nothing to the statistics"
    after = params(parts)
    assert all(torch.equal(before[k], after[k]) or torch.isnan(before[k]).any() for k in before)
    assert parts.training.scheduler.scheduler.last_epoch == 0, "the learning-rate schedule does not advance"


@pytest.mark.parametrize("max_grad_norm", [1.0, None], ids=["clipped", "unclipped"])
def test_nan_gradient_is_caught_with_or_without_clipping(make_recipe, max_grad_norm):
    recipe = load_recipe(make_recipe(train={"steps": 3, "micro_batch_size": 2, "lr": 1e-3,
                                            "max_grad_norm": max_grad_norm}))
    parts = setup_run(recipe)
    student = engine.dist_mod.unwrap(parts.training.accelerator, parts.training.student)
    hook = student.model.norm.weight.register_hook(lambda grad: grad * float("nan"))
    before = params(parts)
    result = train_step(parts.training, parts.plan, 0)
    assert result.skipped and result.problems[0].startswith("the gradient norm is NaN/inf (sources: ")
    assert all(torch.equal(before[k], v) for k, v in params(parts).items())
    assert all(p.grad is None for p in student.parameters()), "the bad gradients are dropped"
    hook.remove()
    assert not train_step(parts.training, parts.plan, 1).skipped
    assert not all(torch.equal(before[k], v) for k, v in params(parts).items())


def test_skip_keeps_accumulation_windows_aligned(make_recipe, monkeypatch):
    """A step skipped at its first micro-batch still ends its window: the next step makes exactly
    one optimizer update after its own two micro-batches."""
    recipe = load_recipe(make_recipe(train={"steps": 2, "micro_batch_size": 2, "grad_accum": 2, "lr": 1e-3}))
    parts = setup_run(recipe)
    real = engine.forward_micro
    calls = []

    def flaky(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            raise NonFiniteError("teacher 'code' produced NaN/inf log-probabilities")
        return real(*args, **kwargs)

    monkeypatch.setattr(engine, "forward_micro", flaky)
    updates = []
    inner = getattr(parts.training.optimizer, "optimizer", parts.training.optimizer)
    inner.register_step_pre_hook(lambda *a: updates.append(parts.training.accelerator.step))
    assert train_step(parts.training, parts.plan, 0).skipped and len(calls) == 1 and updates == []
    assert parts.training.accelerator.step == 2, "both micro-batches of the skipped step were counted"
    assert not train_step(parts.training, parts.plan, 1).skipped
    assert updates == [4] and len(calls) == 3


def test_run_skips_one_bad_step_in_the_middle(make_recipe, monkeypatch):
    recipe = load_recipe(make_recipe(train={"steps": 3, "micro_batch_size": 2, "lr": 1e-3, "on_nonfinite": "skip"}))
    real = engine.train_step

    def nan_at_step_2(training, plan, step):
        if step != 1:
            return real(training, plan, step)
        student = engine.dist_mod.unwrap(training.accelerator, training.student)
        hook = student.model.norm.weight.register_hook(lambda grad: grad * float("inf"))
        try:
            return real(training, plan, step)
        finally:
            hook.remove()

    monkeypatch.setattr(engine, "train_step", nan_at_step_2)
    out = io.StringIO()
    run_dir = run(recipe, console=Console(file=out, width=300))
    facts = json.loads((run_dir / "run.json").read_text())
    assert facts["skipped_steps"] == 1 and facts["steps_done"] == 3 and facts["status"] == "complete"
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 3]
    assert "skipped step 2: the gradient norm is NaN/inf" in out.getvalue()
