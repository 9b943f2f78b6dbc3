"""Everything a run needs before its first step, and what it writes after each and at the end."""

from __future__ import annotations

import datetime as dt
import math
import resource
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from rich.console import Console
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from merge_distill import distributed as dist_mod
from merge_distill.checkpoint import check_resumable
from merge_distill.data import MixedStream, build_rows, steps_for_epochs
from merge_distill.losses import DIVERGENCES
from merge_distill.models import load_student, load_teachers, load_tokenizer, tokenizer_source
from merge_distill.recipe import Recipe
from merge_distill.report.build import write_report
from merge_distill.report.live import LiveDisplay
from merge_distill.report.stats import BlendStats
from merge_distill.routing import build_router
from merge_distill.routing.base import Router
from merge_distill.rundir import (
    append_jsonl,
    model_card,
    prepare_run_dir,
    save_router,
    write_json_atomic,
    write_text_atomic,
)
from merge_distill.cache import CachedTeacherEnsemble, open_cache
from merge_distill.teachers import TeacherEnsemble


def now_iso() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def peak_memory_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # Linux reports KiB


def lr_lambda(schedule: str, warmup: int, total: int):
    def factor(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        if schedule == "linear":
            return max(0.0, 1.0 - progress)
        if schedule == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
        return 1.0

    return factor


@dataclass
class RunParts:
    recipe: Recipe
    accelerator: Accelerator
    world: dict[str, int]
    console: Console
    run_dir: Path
    tokenizer: PreTrainedTokenizerBase
    vocab_size: int
    student: Any
    teacher_names: list[str]
    ensemble: TeacherEnsemble | CachedTeacherEnsemble
    router: Router
    router_optimizer: torch.optim.Optimizer | None
    divergence: Any
    optimizer: Any
    scheduler: Any
    stream: MixedStream
    stats: BlendStats
    total_steps: int
    live: LiveDisplay
    facts: dict[str, Any]

    @property
    def is_main(self) -> bool:
        return self.world["rank"] == 0

    def record_step(self, row: dict[str, Any], tokens_seen: int, skipped: int) -> None:
        if self.is_main:
            append_jsonl(self.run_dir / "metrics.jsonl", row)
        self.facts.update(steps_done=row["step"], tokens_seen=tokens_seen, skipped_steps=skipped,
                          last_metrics={k: row[k] for k in ("loss", "divergence", "ce")})

    def save_student(self) -> Path:
        state = dist_mod.gather_student_state_dict(self.accelerator, self.student)
        out = self.run_dir / "student"
        if self.is_main:
            model: PreTrainedModel = dist_mod.unwrap(self.accelerator, self.student)
            model.save_pretrained(out, state_dict=state, safe_serialization=True)
            self.tokenizer.save_pretrained(out)
            if any(True for _ in self.router.parameters()):
                save_router(self.router, self.run_dir / "router.safetensors")
        return out

    def write_facts(self) -> None:
        """run.json: the run's facts (the last metrics go to the model card, not here)."""
        write_json_atomic(self.run_dir / "run.json", {k: v for k, v in self.facts.items() if k != "last_metrics"})

    def finish(self, status: str, tokens_seen: int, skipped: int, wall: float) -> None:
        """Save the student (when training completed) and write the run's files (rank 0)."""
        if status == "complete":
            self.save_student()
        if self.world["world_size"] > 1:
            self.stats = self.stats.all_reduce(lambda t: dist_mod.all_reduce_sum(self.accelerator, t.to(self.accelerator.device)).cpu(),
                                  self.recipe.train_domains)
        if not self.is_main:
            return
        self.facts.update(
            status=status, finished_at=now_iso() if status == "complete" else None, wall_time_s=wall,
            tokens_seen=tokens_seen, skipped_steps=skipped, peak_memory_bytes=peak_memory_bytes(self.accelerator.device),
        )
        write_json_atomic(self.run_dir / "stats.json", self.stats.summary())
        if status == "complete" and self.recipe.data.eval and self.recipe.report.eval_at_end:
            from merge_distill.evaluate import evaluate_recipe

            self.console.print("evaluating student and teachers on held-out data ...")
            result = evaluate_recipe(self.recipe, self.run_dir / "student", teachers=self.recipe.report.eval_teachers)
            write_json_atomic(self.run_dir / "eval.json", result)
        self.write_facts()
        if status == "complete":
            write_text_atomic(self.run_dir / "student" / "README.md",
                              model_card(self.recipe, self.facts, self.facts.get("last_metrics", {})))
        write_report(self.run_dir)


def setup_run(recipe: Recipe, overwrite: bool = False, console: Console | None = None,
              resume: bool = False) -> RunParts:
    r, dist = recipe.train, recipe.distributed
    accelerator = dist_mod.make_accelerator(dist, r.precision, r.grad_accum, r.max_grad_norm or 0.0, r.micro_batch_size)
    world = dist_mod.world_info()
    is_main = world["rank"] == 0
    console = console or Console()
    run_dir = Path(recipe.output.dir)
    if is_main:
        prepare_run_dir(run_dir, overwrite, resume)
    if resume:  # refuse before anything is loaded or written (a changed recipe, no checkpoint)
        check_resumable(run_dir, recipe, world["world_size"])
    accelerator.wait_for_everyone()
    torch.manual_seed(r.seed)

    source, revision, trust = tokenizer_source(recipe)
    tokenizer = load_tokenizer(source, revision, trust)
    vocab_size = len(tokenizer)
    # A pretrained student is partitioned as it loads under ZeRO-3; a derived one is built whole.
    init = dist_mod.student_init_context(accelerator, dist) if recipe.student.model is not None else nullcontext()
    with init:
        student = load_student(recipe)
    from_cache = recipe.cache is not None and recipe.cache.use  # teachers answered by the cache: none loaded
    # Under ZeRO-3 no process holds a whole teacher: each is partitioned as it loads.
    models = [] if from_cache else load_teachers(
        recipe, student, lambda dtype: dist_mod.teacher_init_context(accelerator, dist, dtype))

    keys = [f"data.train[{i}]" for i in range(len(recipe.data.train))]
    sources = [build_rows(s, k, tokenizer, recipe.data.seq_len, recipe.data.packing) for s, k in zip(recipe.data.train, keys)]
    cached = open_cache(recipe, tokenizer, sources) if from_cache else None  # UserError if its manifest differs
    global_rows = r.micro_batch_size * r.grad_accum * world["world_size"]
    total_rows_available = sum(len(s) for s in sources)
    total_steps = r.steps or steps_for_epochs(r.epochs, total_rows_available, global_rows)
    stream = MixedStream(sources, [s.weight for s in recipe.data.train], r.seed, total_steps * global_rows)

    router = build_router(recipe.routing, recipe.teacher_names, student.config.hidden_size).to(accelerator.device)
    router_params = list(router.parameters())
    router_optimizer = torch.optim.AdamW(router_params, lr=recipe.routing.lr) if router_params else None
    optimizer = torch.optim.AdamW(student.parameters(), lr=r.lr, weight_decay=r.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(r.schedule, r.warmup_steps, total_steps))
    student, optimizer, scheduler = dist_mod.prepare_student(accelerator, dist, student, optimizer, scheduler)
    teachers = [dist_mod.prepare_teacher(accelerator, dist, m) for m in models]

    facts = {
        "name": recipe.name, "recipe_hash": recipe.content_hash(), "recipe_path": str(run_dir / "recipe.yaml"),
        "run_dir": str(run_dir), "student_dir": str(run_dir / "student"), "teachers": recipe.teacher_names,
        "router": recipe.routing.kind, "blend": recipe.routing.blend, "loss": recipe.loss.kind,
        "steps_planned": total_steps, "steps_done": 0, "tokens_seen": 0, "started_at": now_iso(),
        "finished_at": None, "wall_time_s": 0.0, "world_size": world["world_size"], "peak_memory_bytes": None,
        "status": "running", "skipped_steps": 0,
    }
    if is_main:
        write_text_atomic(run_dir / "recipe.yaml", recipe.to_yaml())
        write_json_atomic(run_dir / "run.json", facts)
        if not resume:  # exists from the start, even if every step is skipped
            write_text_atomic(run_dir / "metrics.jsonl", "")
    return RunParts(
        recipe=recipe, accelerator=accelerator, world=world, console=console, run_dir=run_dir,
        tokenizer=tokenizer, vocab_size=vocab_size, student=student, teacher_names=recipe.teacher_names,
        ensemble=cached or TeacherEnsemble(recipe.teacher_names, teachers, vocab_size, r.chunk_tokens),
        router=router, router_optimizer=router_optimizer, divergence=DIVERGENCES.get(recipe.loss.kind).impl,
        optimizer=optimizer, scheduler=scheduler, stream=stream, stats=BlendStats(recipe.teacher_names),
        total_steps=total_steps,
        live=LiveDisplay(total_steps, recipe.teacher_names, console=console, refresh_every=r.log_every, enabled=is_main),
        facts=facts,
    )
