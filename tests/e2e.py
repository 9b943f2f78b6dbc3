"""One end-to-end helper: run a recipe, then check what every finished run must satisfy.

    run_dir, rows = run_and_check(recipe)

Invariants checked:
- run.json says complete, with every planned step done; metrics.jsonl has one row per counted
  step, each with a finite loss and routing shares that sum to 1 over the teachers;
- the saved student reloads with plain `from_pretrained` (no missing or unexpected weights) and
  gives exactly the logits of the in-memory student at the moment it was saved;
- report.json exists and the report renders, naming every teacher.
"""

from __future__ import annotations

import io
import json
import math
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from transformers import AutoModelForCausalLM

from merge_distill import distributed as dist_mod
from merge_distill.engine import run
from merge_distill.report.build import load_report
from merge_distill.report.render import render_report
from merge_distill.schema import Recipe
from merge_distill.training import Training

PROBE_LEN = 12


def run_and_check(recipe: Recipe, **run_kwargs: Any) -> tuple[Path, list[dict[str, Any]]]:
    """Run `recipe` (engine.run), check the invariants above, return (run_dir, metrics rows)."""
    probe = torch.arange(PROBE_LEN).unsqueeze(0) % 7 + 5  # token ids present in every test vocabulary
    seen: dict[str, torch.Tensor] = {}
    real_save = Training.save_student

    def save_and_remember(self: Training, out: Path, tokenizer) -> Path:
        model = dist_mod.unwrap(self.accelerator, self.student)
        was_training = model.training
        with torch.no_grad():
            seen["logits"] = model.eval()(probe.to(self.accelerator.device)).logits.float().cpu()
        model.train(was_training)
        return real_save(self, out, tokenizer)

    Training.save_student = save_and_remember  # type: ignore[method-assign]
    try:
        run_dir = run(recipe, **run_kwargs)
    finally:
        Training.save_student = real_save  # type: ignore[method-assign]

    facts = json.loads((run_dir / "run.json").read_text())
    assert facts["status"] == "complete", facts
    assert facts["steps_done"] == facts["steps_planned"], facts
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == facts["steps_done"] - facts["skipped_steps"]
    for row in rows:
        assert math.isfinite(row["loss"]), row
        assert abs(sum(row["share"].values()) - 1.0) < 1e-6 or recipe.loss.hard_label_weight == 1.0, row

    reloaded, info = AutoModelForCausalLM.from_pretrained(run_dir / "student", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    with torch.no_grad():
        logits = reloaded.eval()(probe).logits.float()
    assert torch.equal(logits, seen["logits"]), "the saved student gives other logits than the trained one"

    out = io.StringIO()
    render_report(load_report(run_dir), Console(file=out, width=160, no_color=True))
    text = out.getvalue()
    for name in recipe.teacher_names:
        assert name in text, f"the report does not name teacher {name!r}"
    return run_dir, rows
