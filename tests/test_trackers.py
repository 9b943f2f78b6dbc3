"""Experiment trackers through accelerate (`output.report_to`), checked offline with TensorBoard:
the event files read back (tensorboard's EventAccumulator) equal metrics.jsonl and eval.json."""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import pytest
from rich.console import Console
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from conftest import pico_recipe_dict, run_cli, write_recipe
from merge_distill.engine import run
from merge_distill.recipe import load_recipe

pytestmark = pytest.mark.usefixtures("one_thread")


def tracked_recipe(pico, folder: Path, **output) -> Path:
    recipe = pico_recipe_dict(pico, folder / "run", routing={"kind": "ce", "tau": 1.0},
                              train={"steps": 4, "micro_batch_size": 2, "lr": 1e-3, "seed": 0, "log_every": 1},
                              output={"dir": str(folder / "run"), "report_to": ["tensorboard"], **output})
    recipe["data"]["eval"] = [{"type": "jsonl", "path": str(pico["prose"]), "domain": "prose", "max_examples": 2}]
    recipe["data"]["eval_tokens"] = 64
    return write_recipe(folder / "recipe.yaml", recipe)


def scalars(run_dir: Path) -> dict[str, dict[int, float]]:
    """Every scalar tag of the run's TensorBoard folder: {tag: {step: value}} (the last write of a
    step wins, as TensorBoard shows it)."""
    events = EventAccumulator(str(run_dir / "trackers" / "pico"), size_guidance={"scalars": 0})
    events.Reload()
    return {tag: {e.step: e.value for e in events.Scalars(tag)} for tag in events.Tags()["scalars"]}


def quiet() -> Console:
    return Console(file=io.StringIO())


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def assert_matches_metrics(logged: dict[str, dict[int, float]], rows: list[dict]) -> None:
    for row in rows:
        for key in ("loss", "divergence", "ce", "lr", "tokens_per_s"):
            assert logged[key][row["step"]] == pytest.approx(row[key], rel=1e-6), (key, row["step"])
        for name, share in row["share"].items():
            assert logged[f"share/{name}"][row["step"]] == pytest.approx(share, rel=1e-6)
        assert logged["skipped_steps"][row["step"]] == 0.0


def test_tensorboard_receives_the_step_metrics_the_evaluation_and_the_recipe(pico, tmp_path) -> None:
    run_dir = run(load_recipe(tracked_recipe(pico, tmp_path)), console=quiet())
    logged = scalars(run_dir)
    rows = metrics(run_dir)
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert_matches_metrics(logged, rows)
    evaluation = json.loads((run_dir / "eval.json").read_text())
    for row in evaluation["rows"]:
        for domain, value in row["ppl"].items():
            assert logged[f"eval/{row['model']}/ppl/{domain}"] == {4: pytest.approx(value, rel=1e-6)}
    hparams = next((run_dir / "trackers" / "pico").rglob("hparams.yml")).read_text()
    assert "routing.kind: ce" in hparams and "train.steps: 4" in hparams  # the resolved recipe as the config


def test_resume_continues_the_same_tensorboard_run(pico, tmp_path) -> None:
    """Checkpoints after every step; the last two removed as a kill after step 2 would leave them:
    the resumed run logs steps 3 and 4 again into the same folder, and every step reads back as
    metrics.jsonl says."""
    recipe = tracked_recipe(pico, tmp_path, save_every=1, keep_last=4)
    run_dir = run(load_recipe(recipe), console=quiet())
    run_id = (run_dir / "trackers" / "run_id").read_text()
    for step in (3, 4):
        shutil.rmtree(run_dir / "checkpoints" / f"step-{step:06d}")
    shutil.rmtree(run_dir / "student")
    run(load_recipe(recipe), resume=True, console=quiet())
    assert (run_dir / "trackers" / "run_id").read_text() == run_id  # the same tracker run (wandb resumes by id)
    logged = scalars(run_dir)
    assert set(logged["loss"]) == {1, 2, 3, 4}
    assert_matches_metrics(logged, metrics(run_dir))


def test_a_tracker_that_is_not_installed_is_a_validation_error(pico, tmp_path, monkeypatch, capsys) -> None:
    import accelerate.tracking

    monkeypatch.setattr(accelerate.tracking, "is_clearml_available", lambda: False)
    recipe = tracked_recipe(pico, tmp_path)
    code, out = run_cli(["validate", str(recipe), "output.report_to=[tensorboard, clearml]"], monkeypatch, capsys)
    assert code == 2 and "output.report_to names 'clearml'" in out and "pip install clearml" in out
    assert "Traceback" not in out
