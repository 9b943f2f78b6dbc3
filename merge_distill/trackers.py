"""Experiment trackers (`output.report_to`), through accelerate's tracker API.

accelerate logs on the main process only; every process may call these. Logged:
- at the start: the resolved recipe as the run's configuration (flattened to `section.key`);
- every step: the metrics.jsonl row's numbers (loss, divergence, ce, lr, tokens/s, ...), the
  routing shares as `share/<teacher>`, and `skipped_steps`, at the row's step;
- at the end: the evaluation per domain as `eval/<model>/<ppl|bpb>/<domain>`, at the last step.
Files go under RUN_DIR/trackers/ (TensorBoard: trackers/<recipe name>/). Resume continues the
same tracker run where the tracker can: TensorBoard appends to the same folder; Weights & Biases
resumes the run id kept in trackers/run_id; the others start a new run in the same project.
"""

from __future__ import annotations

import json
import secrets
from pathlib import Path
from typing import Any

import accelerate.tracking
from accelerate import Accelerator

from merge_distill.schema import Recipe

# The pip package that provides each tracker accelerate knows.
TRACKER_PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow", "trackio": "trackio",
                    "comet_ml": "comet_ml", "aim": "aim", "clearml": "clearml", "dvclive": "dvclive",
                    "swanlab": "swanlab"}


def tracker_problems(recipe: Recipe) -> list[str]:
    """A tracker named in output.report_to whose package is not installed (validation)."""
    problems = []
    for name in recipe.output.report_to:
        if not getattr(accelerate.tracking, f"is_{name}_available")():
            problems.append(f"output.report_to names {name!r} but its package is not installed; run "
                            f"`pip install {TRACKER_PACKAGES[name]}`, or remove it from output.report_to")
    return problems


def flatten(values: dict[str, Any], prefix: str = "") -> dict[str, bool | int | float | str]:
    """Nested recipe values -> {"train.lr": 0.001, ...}; lists and None as JSON text (what every
    tracker's configuration accepts)."""
    out: dict[str, bool | int | float | str] = {}
    for key, value in values.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, f"{name}."))
        elif isinstance(value, (bool, int, float, str)):
            out[name] = value
        else:
            out[name] = json.dumps(value)
    return out


def step_values(row: dict[str, Any], skipped: int) -> dict[str, float]:
    """A metrics.jsonl row -> the scalars a tracker logs for that step."""
    out = {k: float(v) for k, v in row.items() if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)}
    out.update({f"share/{name}": float(v) for name, v in row.get("share", {}).items()})
    out["skipped_steps"] = float(skipped)
    return out


def eval_values(evaluation: dict[str, Any]) -> dict[str, float]:
    """eval.json -> eval/<model>/<ppl|bpb>/<domain> scalars."""
    return {f"eval/{row['model']}/{unit}/{domain}": float(value)
            for row in evaluation["rows"] for unit in ("ppl", "bpb") for domain, value in row.get(unit, {}).items()}


class Trackers:
    """The run's trackers; a no-op when output.report_to is empty."""

    def __init__(self, accelerator: Accelerator, recipe: Recipe, run_dir: Path, resume: bool):
        self.accelerator = accelerator
        self.enabled = bool(recipe.output.report_to)
        if not self.enabled:
            return
        id_file = run_dir / "trackers" / "run_id"
        if accelerator.is_main_process and not (resume and id_file.is_file()):
            id_file.parent.mkdir(parents=True, exist_ok=True)
            id_file.write_text(secrets.token_hex(8))
        accelerator.wait_for_everyone()
        run_id = id_file.read_text().strip()
        init_kwargs = {"wandb": {"id": run_id, "resume": "allow", "dir": str(run_dir / "trackers")}}
        accelerator.init_trackers(recipe.name, config=flatten(recipe.model_dump(mode="json")),
                                  init_kwargs={k: v for k, v in init_kwargs.items() if k in recipe.output.report_to})

    def log_step(self, row: dict[str, Any], skipped: int) -> None:
        if self.enabled:
            self.accelerator.log(step_values(row, skipped), step=int(row["step"]))

    def finish(self, evaluation: dict[str, Any] | None, step: int) -> None:
        if not self.enabled:
            return
        if evaluation is not None:
            self.accelerator.log(eval_values(evaluation), step=step)
        self.accelerator.end_training()
