"""The record of a run: run.json facts, metrics.jsonl, routing statistics, the live display,
and the files written at the end (stats.json, eval.json, the model card, report.json).

Only the main process writes; every process keeps its own BlendStats, summed at the end.
"""

from __future__ import annotations

import datetime as dt
import resource
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from rich.console import Console

from merge_distill.report.build import write_report
from merge_distill.report.live import LiveDisplay
from merge_distill.report.stats import BlendStats
from merge_distill.rundir import append_jsonl, model_card, write_json_atomic, write_text_atomic
from merge_distill.schema import Recipe
from merge_distill.trackers import Trackers


def now_iso() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def peak_memory_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # Linux reports KiB


@dataclass
class Recorder:
    recipe: Recipe
    run_dir: Path
    console: Console
    live: LiveDisplay
    stats: BlendStats
    facts: dict[str, Any]
    is_main: bool
    trackers: Trackers

    @classmethod
    def start(cls, recipe: Recipe, run_dir: Path, console: Console, total_steps: int, world_size: int,
              is_main: bool, resume: bool, trackers: Trackers, trained: str | None = None) -> "Recorder":
        """The run's first files: the resolved recipe, run.json and (new runs) an empty metrics.jsonl."""
        facts = {
            "name": recipe.name, "recipe_hash": recipe.content_hash(), "recipe_path": str(run_dir / "recipe.yaml"),
            "run_dir": str(run_dir), "student_dir": str(run_dir / "student"), "teachers": recipe.teacher_names,
            "router": recipe.routing.kind, "blend": recipe.routing.blend, "loss": recipe.loss.kind,
            "steps_planned": total_steps, "steps_done": 0, "tokens_seen": 0, "started_at": now_iso(),
            "finished_at": None, "wall_time_s": 0.0, "world_size": world_size, "peak_memory_bytes": None,
            "status": "running", "skipped_steps": 0, "trained": trained,
        }
        if is_main:
            write_text_atomic(run_dir / "recipe.yaml", recipe.to_yaml())
            write_json_atomic(run_dir / "run.json", facts)
            if not resume:  # exists from the start, even if every step is skipped
                write_text_atomic(run_dir / "metrics.jsonl", "")
        live = LiveDisplay(total_steps, recipe.teacher_names, console=console, refresh_every=recipe.train.log_every,
                           enabled=is_main)
        return cls(recipe, run_dir, console, live, BlendStats(recipe.teacher_names), facts, is_main, trackers)

    def record_step(self, row: dict[str, Any], tokens_seen: int, skipped: int) -> None:
        if self.is_main:
            append_jsonl(self.run_dir / "metrics.jsonl", row)
        self.trackers.log_step(row, skipped)
        self.facts.update(steps_done=row["step"], tokens_seen=tokens_seen, skipped_steps=skipped,
                          last_metrics={k: row[k] for k in ("loss", "divergence", "ce")})

    def write_facts(self) -> None:
        """run.json: the run's facts (the last metrics go to the model card, not here)."""
        write_json_atomic(self.run_dir / "run.json", {k: v for k, v in self.facts.items() if k != "last_metrics"})

    def finish(self, status: str, tokens_seen: int, skipped: int, wall: float, device: torch.device,
               evaluation: dict[str, Any] | None) -> None:
        """Write the end-of-run files (main process; `stats` already summed over processes) and close
        the trackers (every process)."""
        self.trackers.finish(evaluation, int(self.facts["steps_done"]))
        if not self.is_main:
            return
        self.facts.update(
            status=status, finished_at=now_iso() if status == "complete" else None, wall_time_s=wall,
            tokens_seen=tokens_seen, skipped_steps=skipped, peak_memory_bytes=peak_memory_bytes(device),
        )
        write_json_atomic(self.run_dir / "stats.json", self.stats.summary())
        if evaluation is not None:
            write_json_atomic(self.run_dir / "eval.json", evaluation)
        self.write_facts()
        if status == "complete":
            write_text_atomic(self.run_dir / "student" / "README.md",
                              model_card(self.recipe, self.facts, self.facts.get("last_metrics", {})))
        write_report(self.run_dir)
