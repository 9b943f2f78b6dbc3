"""tools/bench_floor.py does the engine's work: on the same batch it computes the same loss and
makes the same update as `train_step` (uniform mixture, forward KL, AdamW, no clipping), so the
throughput bench compares like with like."""

from __future__ import annotations

import io
import sys
from pathlib import Path

import pytest
import torch
from rich.console import Console
from transformers import AutoModelForCausalLM

from conftest import pico_recipe_dict, write_recipe
from merge_distill.engine import train_step
from merge_distill.recipe import load_recipe
from merge_distill.engine import setup_run
from merge_distill.signals import IGNORE_INDEX
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tools"))
from bench_floor import floor_step  # noqa: E402


def test_floor_step_matches_the_engine(pico, tmp_path) -> None:
    train = {"steps": 2, "micro_batch_size": 2, "lr": 1e-3, "schedule": "constant", "max_grad_norm": None,
             "seed": 0, "log_every": 100}
    path = write_recipe(tmp_path / "r.yaml", pico_recipe_dict(pico, tmp_path / "run", train=train))
    parts = setup_run(load_recipe(path), overwrite=True, console=Console(file=io.StringIO()))
    teachers = [AutoModelForCausalLM.from_pretrained(pico[t]).eval().requires_grad_(False)
                for t in ("teacher_a", "teacher_b")]
    student = AutoModelForCausalLM.from_pretrained(pico["student"]).train()
    initial = {name: param.detach().clone() for name, param in student.named_parameters()}
    optimizer = torch.optim.AdamW(student.parameters(), lr=1e-3, weight_decay=0.0)
    for step in range(2):
        (batch,) = parts.plan.micro_batches(step, parts.training.accelerator.device)
        B, T = batch.input_ids.shape
        # The floor normalises by B * (T - 1): packed rows, every position but the last has a target.
        assert int((batch.targets != IGNORE_INDEX).sum()) == B * (T - 1)
        floor_loss = floor_step(teachers, student, optimizer, batch.input_ids, parts.training.vocab_size)
        engine_loss = train_step(parts.training, parts.plan, step).loss
        assert float(floor_loss) == pytest.approx(engine_loss, rel=1e-5)
    # Adam divides each gradient by its running RMS, so a parameter whose gradient is nearly 0
    # turns a rounding difference into a visible one; lr = 1e-3 bounds any step's move.
    engine_params = dict(parts.training.student.named_parameters())
    differ = total = 0
    moved = 0.0
    for name, param in student.named_parameters():
        diff = (param - engine_params[name]).detach().abs()
        assert float(diff.max()) < 1e-4, name
        differ += int((diff > 1e-6).sum())
        total += diff.numel()
        moved = max(moved, float((param - initial[name]).detach().abs().max()))
    assert differ / total < 1e-3
    assert moved > 1e-4  # both really trained
