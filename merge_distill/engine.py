"""The training loop: the only place that knows the order of a step.

    batch -> teachers (inference) -> router weights -> chunked blend + divergence -> backward -> step

Loss normalisation: every micro-batch's summed loss is divided by the number of valid target
tokens of the whole optimizer step, over all micro-batches and all processes, so the gradient
is the same whatever the micro-batch size, accumulation or world size.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from rich.markup import escape
from torch import Tensor

from merge_distill import checkpoint as ckpt
from merge_distill import distributed as dist_mod
from merge_distill.cache import SparseTeacherSignals, sparse_agreement
from merge_distill.losses.chunked import distill_loss
from merge_distill.losses.sparse import sparse_distill_loss
from merge_distill.recipe import Recipe
from merge_distill.report.stats import BlendStats
from merge_distill.routing.base import RouterInputs
from merge_distill.run_setup import RunParts, setup_run
from merge_distill.signals import IGNORE_INDEX, TokenBatch
from merge_distill.teachers import NonFiniteError


# Teacher agreement (report only: pairwise JS over full distributions) is estimated on this many
# evenly spaced valid tokens per micro-batch; over a run that is thousands of tokens.
AGREEMENT_TOKENS = 64


@dataclass
class StepResult:
    loss: float
    divergence: float
    ce: float
    tokens: int
    share: dict[str, float]
    skipped: bool = False
    problems: list[str] = field(default_factory=list)  # what was NaN/inf, and the batch's sources
    fatal: bool = False  # the update already happened (DeepSpeed steps inside backward): cannot skip
    overflow: bool = False  # fp16 loss scaling skipped the update: routine, never a reason to stop


def global_sum(parts: RunParts, value: float) -> float:
    """value summed over processes; alone, value itself (no device round trip on the step's path)."""
    if parts.accelerator.num_processes == 1:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=parts.accelerator.device)
    return float(dist_mod.all_reduce_sum(parts.accelerator, t).item())


def average_gradients(parts: RunParts, module: torch.nn.Module) -> None:
    """Average a small replicated module's gradients over processes (the learned gate)."""
    world = parts.world["world_size"]
    if world == 1:
        return
    for p in module.parameters():
        if p.grad is not None:
            p.grad = dist_mod.all_reduce_sum(parts.accelerator, p.grad) / world


def micro_batches(parts: RunParts, step: int) -> list[TokenBatch]:
    """This process's micro-batches of optimizer step `step` (a pure function of the step)."""
    r = parts.recipe.train
    world, rank = parts.world["world_size"], parts.world["rank"]
    rows_per_micro = r.micro_batch_size * world
    out = []
    for micro in range(r.grad_accum):
        start = (step * r.grad_accum + micro) * rows_per_micro + rank * r.micro_batch_size
        out.append(parts.stream.rows(start, r.micro_batch_size).to(parts.accelerator.device))
    return out


def forward_micro(parts: RunParts, batch: TokenBatch, n_global: float, stats: BlendStats) -> tuple[Tensor, dict]:
    """One micro-batch: returns the loss to backpropagate (already normalised) and its parts;
    adds the micro-batch's routing statistics to `stats`."""
    recipe, router = parts.recipe, parts.router
    targets = batch.targets
    mask = targets != IGNORE_INDEX
    w_ce = recipe.loss.hard_label_weight
    out = parts.student(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                        output_hidden_states=router.needs_hidden, use_cache=False)
    student_logits = out.logits[..., : parts.vocab_size]
    info: dict = {"share_sum": torch.zeros(len(parts.teacher_names), dtype=torch.float64)}
    if w_ce < 1.0:
        signals = parts.ensemble.signals(batch, targets)
        hidden = out.hidden_states[-1].detach().float() if router.needs_hidden else None
        inputs = RouterInputs(signals.gold_nll.clone(), signals.entropy.clone(), mask, batch.domains, hidden)
        weights = router(inputs)
        aux = router.aux_loss(inputs)
        if isinstance(signals, SparseTeacherSignals):  # from the offline cache: top-k + tail targets
            result = sparse_distill_loss(student_logits, signals.topk_ids, signals.topk_logprobs, signals.tail_logprobs,
                                         weights.detach(), targets, parts.divergence, recipe.loss,
                                         recipe.routing.blend, recipe.train.chunk_tokens, compute_ce=True)
            stats.add_agreement(*sparse_agreement(signals, mask, parts.vocab_size, max_tokens=AGREEMENT_TOKENS))
        else:
            result = distill_loss(student_logits, signals.logits, weights.detach(), targets,
                                  parts.divergence, recipe.loss, recipe.routing.blend,
                                  recipe.train.chunk_tokens, compute_ce=True, teachers_normalized=signals.normalized)
            stats.update_agreement(signals.logits, mask, max_tokens=AGREEMENT_TOKENS)
        stats.update(weights.detach(), signals.gold_nll, signals.entropy, mask, batch.domains,
                           result.target_entropy_sum)
        info["share_sum"] = weights.detach().double().sum(dim=(0, 1)).cpu()
        div_sum, ce_sum = result.divergence_sum, result.ce_sum
        info["aux"] = aux
    else:
        ce_sum = torch.nn.functional.cross_entropy(
            student_logits.float().flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX, reduction="sum")
        div_sum = torch.zeros((), device=ce_sum.device)
    # At weight 0 the cross-entropy is only reported: detached, its backward (a softmax per
    # chunk) is skipped instead of computed and multiplied by 0.
    loss_sum = (1.0 - w_ce) * div_sum + w_ce * (ce_sum if w_ce > 0 else ce_sum.detach())
    # Each process holds its share of the global sum; DDP/DeepSpeed average gradients over
    # processes and accelerate divides by the accumulation steps: undo both so the result is
    # sum over all tokens / n_global.
    scale = parts.world["world_size"] * parts.accelerator.gradient_accumulation_steps / max(n_global, 1.0)
    info.update(loss=float(loss_sum.detach()), div=float(div_sum.detach()), ce=float(ce_sum.detach()))
    return loss_sum * scale, info


def train_step(parts: RunParts, step: int) -> StepResult:
    """One optimizer step over grad_accum micro-batches.

    NaN/inf in a teacher's log-probs, the loss or the gradients is caught on the step it appears:
    the step is skipped (no update of student or router, no statistics) and `problems` says what
    and from which sources. Every process takes the same decision, so they stay in lockstep.
    """
    recipe, acc = parts.recipe, parts.accelerator
    batches = micro_batches(parts, step)
    n_local = sum(int((b.targets != IGNORE_INDEX).sum()) for b in batches)
    n_global = global_sum(parts, n_local)
    totals = {"loss": 0.0, "div": 0.0, "ce": 0.0}
    share = torch.zeros(len(parts.teacher_names), dtype=torch.float64)
    aux_total = None
    stats = BlendStats(parts.teacher_names)  # joins the run's statistics only if the step counts
    problems: list[str] = []
    overflow = False
    for batch in batches:
        # After a problem the remaining micro-batches still pass through accumulate(): accelerate
        # counts them to find the window's end, so the next step starts a fresh window.
        with acc.accumulate(parts.student):
            if problems:
                continue
            sources = f"(sources: {', '.join(sorted(set(batch.sources)))})"
            try:
                loss, info = forward_micro(parts, batch, n_global, stats)
                aux = info.get("aux")
                problem = None
                if not torch.isfinite(loss):
                    problem = f"the loss is NaN/inf {sources}"
                elif aux is not None and not torch.isfinite(aux):
                    problem = f"the router's loss is NaN/inf {sources}"
            except NonFiniteError as exc:
                problem = f"{exc} {sources}"
            if global_sum(parts, float(problem is not None)) > 0:
                problems.append(problem or "NaN/inf on another process")
                continue
            acc.backward(loss)
            if aux is not None:
                (aux / max(n_global, 1.0)).backward()
                aux_total = float(aux.detach()) + (aux_total or 0.0)
            for k in totals:
                totals[k] += info[k]
            share += info["share_sum"]
            if acc.sync_gradients:
                # Without clipping, max_norm=inf only measures: the gradients are scaled by exactly 1.
                norm = acc.clip_grad_norm_(parts.student.parameters(), recipe.train.max_grad_norm or math.inf)
                if norm is not None and not math.isfinite(float(norm)) and acc.scaler is None:
                    all_sources = sorted({s for b in batches for s in b.sources})
                    problems.append(f"the gradient norm is NaN/inf (sources: {', '.join(all_sources)})")
                    continue
                parts.optimizer.step()
                overflow = bool(getattr(parts.optimizer, "step_was_skipped", False))
                parts.scheduler.step()
                parts.optimizer.zero_grad(set_to_none=True)
    if parts.router_optimizer is not None:
        if not (problems or overflow):
            average_gradients(parts, parts.router)
            parts.router_optimizer.step()
        parts.router_optimizer.zero_grad(set_to_none=True)
    if problems or overflow:
        parts.optimizer.zero_grad(set_to_none=True)
        if overflow:
            problems = ["fp16 gradient overflow: the loss scaler skipped the update and lowered its scale"]
        return StepResult(math.nan, math.nan, math.nan, int(n_global), {}, skipped=True, problems=problems,
                          fatal=dist_mod.uses_deepspeed(acc) and not overflow, overflow=overflow)
    parts.stats.merge(stats)
    loss, div, ce = (global_sum(parts, totals[k]) / max(n_global, 1.0) for k in ("loss", "div", "ce"))
    shares = dist_mod.all_reduce_sum(acc, share.to(acc.device)).cpu() / max(n_global, 1.0)
    result = StepResult(loss, div, ce, int(n_global), dict(zip(parts.teacher_names, shares.tolist())))
    if aux_total is not None:
        result.share["_router_nll"] = aux_total / max(n_local, 1)
    return result


def metrics_row(parts: RunParts, step: int, result: StepResult, seconds: float, elapsed: float) -> dict:
    """The metrics.jsonl line of a finished step (1-based `step`)."""
    router_nll = result.share.pop("_router_nll", None)
    row = {
        "step": step, "loss": result.loss, "divergence": result.divergence, "ce": result.ce,
        "lr": parts.scheduler.get_last_lr()[0], "tokens": result.tokens,
        "tokens_per_s": result.tokens / max(seconds, 1e-9), "elapsed_s": elapsed, "share": result.share,
        "world_size": parts.world["world_size"],
    }
    if router_nll is not None:
        row["router_nll"] = router_nll
    return row


def run(recipe: Recipe, overwrite: bool = False, console=None, resume: bool = False) -> Path:
    """Train the student described by `recipe`; returns the run directory.

    resume: continue from the newest complete checkpoint in output.dir, exactly as if the run had
    never stopped. SIGINT/SIGTERM stop at the next step boundary with a checkpoint and raise
    checkpoint.RunInterrupted; NaN/inf with train.on_nonfinite: stop raises NonFiniteError.
    """
    parts = setup_run(recipe, overwrite=overwrite, console=console, resume=resume)
    progress = ckpt.resume(parts) if resume else ckpt.Progress()
    saved_at = progress.step if resume else None  # the step the newest checkpoint holds
    clock = time.perf_counter() - progress.elapsed_s  # wall time continues across resumes
    save_every = recipe.output.save_every
    status = "failed"

    def checkpoint() -> Path:
        """Save the state after `progress.step` steps, unless the newest checkpoint holds it."""
        nonlocal saved_at
        if saved_at != progress.step:
            progress.elapsed_s = time.perf_counter() - clock
            ckpt.save(parts, progress)
            saved_at = progress.step
        return ckpt.checkpoint_root(parts.run_dir) / ckpt.step_name(progress.step)

    try:
        with parts.live as live, ckpt.StopSignals() as signals:
            for step in range(progress.step, parts.total_steps):
                signum = signals.requested(parts)
                if signum is not None:
                    raise ckpt.RunInterrupted(signum, progress.step, checkpoint())
                t0 = time.perf_counter()
                result = train_step(parts, step)
                message = f"step {step + 1}: " + "; ".join(result.problems)
                if result.skipped and not result.overflow:
                    if recipe.train.on_nonfinite == "stop" or result.fatal:
                        if not result.fatal:
                            checkpoint()  # the state before the bad step: resume with on_nonfinite: skip
                        why = ("DeepSpeed applied the update before it could be checked" if result.fatal else
                               "train.on_nonfinite: stop; set it to skip to skip such steps")
                        raise NonFiniteError(f"{message} ({why})")
                progress.step = step + 1
                parts.facts["steps_done"] = progress.step  # skipped steps included: the data position
                if result.skipped:
                    progress.skipped += 1
                    parts.console.print(f"[yellow]skipped {escape(message)}[/]")
                else:
                    progress.tokens_seen += result.tokens
                    row = metrics_row(parts, step + 1, result, time.perf_counter() - t0, time.perf_counter() - clock)
                    parts.record_step(row, progress.tokens_seen, progress.skipped)
                    live.update(step + 1, row)
                if save_every and progress.step % save_every == 0:
                    checkpoint()
            checkpoint()
        status = "complete"
    except (ckpt.RunInterrupted, KeyboardInterrupt):
        status = "interrupted"
        raise
    finally:
        wall = time.perf_counter() - clock
        try:
            parts.finish(status, progress.tokens_seen, progress.skipped, wall)
        except Exception as exc:  # noqa: BLE001  never hide the error that ended the run
            if status == "complete":
                raise
            parts.console.print(f"[yellow]could not record the end of the run: {exc}[/]")
    return parts.run_dir
