"""The training loop: the only place that knows the order of a step.

    batch -> teacher source (signals) -> router weights -> signals.loss (blend + divergence) -> backward -> step

Loss normalisation: every micro-batch's summed loss is divided by the number of valid target
tokens of the whole optimizer step, over all micro-batches and all processes, so the gradient
is the same whatever the micro-batch size, accumulation or world size.
"""

from __future__ import annotations

import json
import math
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch
from rich.console import Console
from rich.markup import escape
from torch import Tensor

from merge_distill import checkpoint as ckpt
from merge_distill import distributed as dist_mod
from merge_distill.errors import NonFiniteError, UserError
from merge_distill.evaluate import evaluate_run
from merge_distill.guard import StepGuard
from merge_distill.models import hidden_before_head, load_tokenizer, logit_softcap, tokenizer_source
from merge_distill.onpolicy import SampledStats, fixed_samples, rollout
from merge_distill.plan import DataPlan, build_plan, training_rows
from merge_distill.recipe_checks import on_policy_problems
from merge_distill.recorder import Recorder
from merge_distill.report.build import ON_POLICY_SAMPLES
from merge_distill.report.stats import BlendStats
from merge_distill.routing.base import RouterInputs
from merge_distill.rundir import prepare_run_dir, write_json_atomic
from merge_distill.schema import Recipe
from merge_distill.signals import IGNORE_INDEX, TokenBatch
from merge_distill.sources.signals import StudentHead
from merge_distill.training import Training, build_training
from merge_distill.trackers import Trackers

# Teacher agreement (report only: pairwise JS over full distributions) is estimated on this many
# evenly spaced valid tokens per micro-batch; over a run that is thousands of tokens.
AGREEMENT_TOKENS = 64


@dataclass
class MicroResult:
    """One micro-batch: the loss to backpropagate (already normalised) and its parts as sums."""

    loss: Tensor
    loss_sum: float
    divergence_sum: float
    ce_sum: float
    share_sum: Tensor            # [K] float64: routing weights summed over valid tokens
    router_loss: Tensor | None   # the learned gate's objective (a sum over valid tokens), or None
    sampled: SampledStats | None = None  # an on-policy micro-batch: what the teachers said of its samples


@dataclass
class StepResult:
    loss: float
    divergence: float
    ce: float
    tokens: int
    share: dict[str, float]
    router_nll: float | None = None  # the learned gate's objective per valid token of this process
    stats: BlendStats | None = None  # the step's routing statistics (None when skipped)
    on_policy: dict | None = None  # with onpolicy.lmbda > 0: sampled tokens, their routing shares, teachers' reverse KL
    skipped: bool = False
    problems: list[str] = field(default_factory=list)  # what was NaN/inf, and the batch's sources
    fatal: bool = False  # the update already happened (DeepSpeed steps inside backward): cannot skip
    overflow: bool = False  # fp16 loss scaling skipped the update: routine, never a reason to stop


def sum_gradients(t: Training, module: torch.nn.Module) -> None:
    """Sum a small replicated module's gradients over processes (the learned gate). Each process's
    gradient is already its share of the global mean (its sum / the global token count), so the
    sum, not the average, is the gradient of the global objective."""
    if t.world_size == 1:
        return
    for p in module.parameters():
        if p.grad is not None:
            p.grad = dist_mod.all_reduce_sum(t.accelerator, p.grad)


def forward_micro(t: Training, batch: TokenBatch, n_global: float, stats: BlendStats) -> MicroResult:
    """One micro-batch; adds its routing statistics to `stats`."""
    router, setup = t.router, t.loss
    targets = batch.targets
    mask = targets != IGNORE_INDEX
    w_ce = setup.config.hard_label_weight
    # train.fused_loss: the head sees one position per row, and the loss makes the logits from the
    # captured hidden states chunk by chunk (the hard-label-only path still needs the logits)
    model = dist_mod.unwrap(t.accelerator, t.student) if t.fused_loss and w_ce < 1.0 else None
    with hidden_before_head(model) if model is not None else nullcontext([]) as head_input:
        out = t.student(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                        output_hidden_states=router.needs_hidden, use_cache=False)
    student_logits = out.logits[..., : t.vocab_size]
    share_sum = torch.zeros(len(t.teacher_names), dtype=torch.float64)
    router_loss, sampled = None, None
    if batch.on_policy:
        w_ce = 0.0  # sampled tokens are not gold labels: the teachers alone grade them
    if w_ce < 1.0:
        source = t.live_source if batch.on_policy and t.live_source is not None else t.source
        signals = source.signals(batch)
        hidden = out.hidden_states[-1].detach().float() if router.needs_hidden else None
        inputs = RouterInputs(signals.gold_nll.clone(), signals.entropy.clone(), mask, batch.domains, hidden)
        weights = signals.route(router(inputs)).detach()  # teachers that do not cover a position: 0 there
        router_loss = router.aux_loss(inputs)
        if model is not None:
            head = StudentHead(model.get_output_embeddings().weight, t.vocab_size, logit_softcap(model))
            result = signals.loss_from_hidden(head_input[-1], head, weights, targets, setup)
        else:
            result = signals.loss(student_logits, weights, targets, setup)
        agreement = signals.agreement(mask, t.vocab_size, AGREEMENT_TOKENS)
        stats.add_agreement(agreement.top1, agreement.js, agreement.tokens)
        stats.update(weights, signals.gold_nll, signals.entropy, mask, batch.domains, result.target_entropy_sum,
                     signals.covered, signals.next_bytes)
        share_sum = weights.double().sum(dim=(0, 1)).cpu()
        div_sum, ce_sum = result.divergence_sum, result.ce_sum
        if batch.on_policy:
            sampled = SampledStats.of(signals, student_logits, weights, targets, setup)
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
    scale = t.world_size * t.accelerator.gradient_accumulation_steps / max(n_global, 1.0)
    return MicroResult(loss_sum * scale, float(loss_sum.detach()), float(div_sum.detach()), float(ce_sum.detach()),
                       share_sum, router_loss, sampled)


def _not_finite(micro: MicroResult) -> str | None:
    if not torch.isfinite(micro.loss):
        return "the loss is NaN/inf"
    if micro.router_loss is not None and not torch.isfinite(micro.router_loss):
        return "the router's loss is NaN/inf"
    return None


def train_step(t: Training, plan: DataPlan, step: int) -> StepResult:
    """One optimizer step over grad_accum micro-batches (the non-finite policy: guard.py)."""
    acc = t.accelerator
    batches = on_policy_batches(t, plan.micro_batches(step, acc.device), step)
    n_local = sum(int((b.targets != IGNORE_INDEX).sum()) for b in batches)
    n_global = dist_mod.global_sum(acc, n_local)
    all_sources = [s for b in batches for s in b.sources]
    guard = StepGuard(acc)
    stats = BlendStats(t.teacher_names)
    sums = {"loss": 0.0, "div": 0.0, "ce": 0.0}
    share = torch.zeros(len(t.teacher_names), dtype=torch.float64)
    router_sum: float | None = None
    sampled = SampledStats.zero(len(t.teacher_names))
    overflow = False
    for batch in batches:
        # After a problem the remaining micro-batches still pass through accumulate(): accelerate
        # counts them to find the window's end, so the next step starts a fresh window.
        with acc.accumulate(t.student):
            if guard.failed:
                continue
            micro = guard.forward(lambda: forward_micro(t, batch, n_global, stats), _not_finite, batch.sources)
            if micro is None:
                continue
            acc.backward(micro.loss)
            guard.backward_done = True
            if micro.router_loss is not None:
                (micro.router_loss / max(n_global, 1.0)).backward()
                router_sum = (router_sum or 0.0) + float(micro.router_loss.detach())
            sums["loss"] += micro.loss_sum
            sums["div"] += micro.divergence_sum
            sums["ce"] += micro.ce_sum
            share += micro.share_sum
            if micro.sampled is not None:
                sampled.add(micro.sampled)
            if acc.sync_gradients:
                # Without clipping, max_norm=inf only measures: the gradients are scaled by exactly 1.
                norm = acc.clip_grad_norm_(t.student.parameters(), t.max_grad_norm or math.inf)
                if not guard.gradients_ok(norm, all_sources):
                    continue
                t.optimizer.step()
                overflow = bool(getattr(t.optimizer, "step_was_skipped", False))
                t.scheduler.step()
                t.optimizer.zero_grad(set_to_none=True)
    if t.router_optimizer is not None:
        if not (guard.failed or overflow):
            sum_gradients(t, t.router)
            t.router_optimizer.step()
        t.router_optimizer.zero_grad(set_to_none=True)
    if guard.failed or overflow:
        t.optimizer.zero_grad(set_to_none=True)
        problems = guard.problems
        if overflow:
            problems = ["fp16 gradient overflow: the loss scaler skipped the update and lowered its scale"]
        return StepResult(math.nan, math.nan, math.nan, int(n_global), {}, skipped=True, problems=problems,
                          fatal=guard.fatal() and not overflow, overflow=overflow)
    loss, div, ce = (dist_mod.global_sum(acc, sums[k]) / max(n_global, 1.0) for k in ("loss", "div", "ce"))
    shares = dist_mod.all_reduce_sum(acc, share.to(acc.device)).cpu() / max(n_global, 1.0)
    router_nll = router_sum / max(n_local, 1) if router_sum is not None else None
    on_policy = sampled.summary(t.teacher_names, lambda x: dist_mod.all_reduce_sum(acc, x.to(acc.device)).cpu()) \
        if t.onpolicy is not None and t.onpolicy.enabled else None
    return StepResult(loss, div, ce, int(n_global), dict(zip(t.teacher_names, shares.tolist())), router_nll, stats,
                      on_policy=on_policy)


def on_policy_batches(t: Training, batches: list[TokenBatch], step: int) -> list[TokenBatch]:
    """The step's micro-batches, the on-policy ones (onpolicy.chosen) replaced by the student's
    samples of their prompts. Sampling comes before the step's token count: the targets of an
    on-policy micro-batch are its sampled tokens."""
    policy = t.onpolicy
    if policy is None or not policy.enabled:
        return batches
    model = dist_mod.unwrap(t.accelerator, t.student)
    chosen = [policy.chosen(step, m) for m in range(len(batches))]
    if policy.engine is not None and any(chosen):
        policy.engine.sync(model, step)  # onpolicy.engine: vllm samples from a copy of the student
    return [rollout(model, b, policy, policy.sampling_seed(step, m)) if on else b
            for m, (b, on) in enumerate(zip(batches, chosen))]


def metrics_row(t: Training, step: int, result: StepResult, seconds: float, elapsed: float) -> dict:
    """The metrics.jsonl line of a finished step (1-based `step`)."""
    row = {
        "step": step, "loss": result.loss, "divergence": result.divergence, "ce": result.ce,
        "lr": t.scheduler.get_last_lr()[0], "tokens": result.tokens,
        "tokens_per_s": result.tokens / max(seconds, 1e-9), "elapsed_s": elapsed, "share": result.share,
        "world_size": t.world_size,
    }
    if result.router_nll is not None:
        row["router_nll"] = result.router_nll
    if result.on_policy is not None:
        row["on_policy"] = result.on_policy
    return row


@dataclass
class Run:
    """A set-up run: its three parts, each handed alone to what needs it."""

    recipe: Recipe
    training: Training
    plan: DataPlan
    recorder: Recorder
    tokenizer: object

    @property
    def run_dir(self) -> Path:
        return self.recorder.run_dir


def setup_run(recipe: Recipe, overwrite: bool = False, console: Console | None = None, resume: bool = False) -> Run:
    """Everything a run needs before its first step. Every check here is also made by
    `merge-distill validate` (recipe_checks.preflight), so a recipe that validates starts."""
    r, dist = recipe.train, recipe.distributed
    run_dir = Path(recipe.output.dir)
    accelerator = dist_mod.make_accelerator(dist, r.precision, r.grad_accum, r.max_grad_norm or 0.0, r.micro_batch_size,
                                            recipe.output.report_to, str(run_dir / "trackers"))
    world = dist_mod.world_info()
    is_main = world["rank"] == 0
    console = console or Console()
    if is_main:
        prepare_run_dir(run_dir, overwrite, resume)
    if resume:  # refuse before anything is loaded or written (a changed recipe, no checkpoint)
        ckpt.check_resumable(run_dir, recipe, world["world_size"])
    accelerator.wait_for_everyone()
    torch.manual_seed(r.seed)
    tokenizer = load_tokenizer(*tokenizer_source(recipe))
    rows = training_rows(recipe, tokenizer)
    problems = on_policy_problems(recipe, rows)
    if problems:
        raise UserError(problems)
    plan = build_plan(recipe, rows, world["world_size"], world["rank"])
    training = build_training(recipe, accelerator, world["world_size"], world["rank"], tokenizer, rows, plan.total_steps)
    recorder = Recorder.start(recipe, run_dir, console, plan.total_steps, world["world_size"], is_main, resume,
                              Trackers(accelerator, recipe, run_dir, resume), trained_parameters(recipe, training))
    return Run(recipe, training, plan, recorder, tokenizer)


def trained_parameters(recipe: Recipe, training: Training) -> str:
    """What the optimizer updates, in words for run.json and the report."""
    counts = [(getattr(p, "ds_numel", p.numel()), p.requires_grad)
              for p in dist_mod.unwrap(training.accelerator, training.student).parameters()]
    total, trained = sum(n for n, _ in counts), sum(n for n, grad in counts if grad)
    lora = recipe.student.lora
    if lora is None:
        return f"every student weight ({total:,} parameters)"
    return (f"LoRA adapters r {lora.r}, alpha {lora.alpha:g} on {', '.join(lora.target_modules)}: {trained:,} of "
            f"{total:,} parameters ({100 * trained / max(total, 1):.2f}%); the base frozen")


def finish(run: Run, status: str, progress: ckpt.Progress, wall: float) -> None:
    """Save the student (when training completed), sum the statistics over processes, evaluate,
    and write the run's files. Every process calls this (saving and evaluation are collective)."""
    t, recorder, recipe = run.training, run.recorder, run.recipe
    evaluation = None
    if status == "complete":
        t.save_student(run.run_dir / "student", run.tokenizer)
        record_samples(run, "end")
        if recipe.data.eval and recipe.report.eval_at_end:
            if t.is_main:
                recorder.console.print("evaluating student and teachers on held-out data ...")
            evaluation = evaluate_run(recipe, t.accelerator, t.student, run.tokenizer, teachers=recipe.report.eval_teachers)
    if t.world_size > 1:
        recorder.stats = recorder.stats.all_reduce(
            lambda x: dist_mod.all_reduce_sum(t.accelerator, x.to(t.accelerator.device)).cpu(), recipe.train_domains)
    recorder.finish(status, progress.tokens_seen, progress.skipped, wall, t.accelerator.device, evaluation)


def record_samples(run: Run, when: str) -> None:
    """With on-policy steps: the student's greedy answers to the prompts of the run's first
    onpolicy.samples rows, at the start or the end ("start" / "end"), into onpolicy_samples.json.
    Every process generates (a ZeRO-3 student's forwards are collectives); the main one writes."""
    t, policy = run.training, run.training.onpolicy
    if policy is None or not policy.enabled or not policy.config.samples:
        return
    rows = run.plan.stream.rows(0, policy.config.samples).to(t.accelerator.device)
    answers = fixed_samples(dist_mod.unwrap(t.accelerator, t.student), rows, policy, run.tokenizer)
    if t.is_main:
        path = run.run_dir / ON_POLICY_SAMPLES
        recorded = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
        write_json_atomic(path, {**recorded, when: answers})


def run(recipe: Recipe, overwrite: bool = False, console: Console | None = None, resume: bool = False) -> Path:
    """Train the student described by `recipe`; returns the run directory.

    resume: continue from the newest complete checkpoint in output.dir, exactly as if the run had
    never stopped. SIGINT/SIGTERM stop at the next step boundary with a checkpoint and raise
    checkpoint.RunInterrupted; NaN/inf with train.on_nonfinite: stop raises NonFiniteError.
    """
    current = setup_run(recipe, overwrite=overwrite, console=console, resume=resume)
    t, plan, recorder = current.training, current.plan, current.recorder
    progress = ckpt.resume(t, recorder, recipe, plan.total_steps) if resume else ckpt.Progress()
    saved_at = progress.step if resume else None  # the step the newest checkpoint holds
    clock = time.perf_counter() - progress.elapsed_s  # wall time continues across resumes
    save_every = recipe.output.save_every
    status = "failed"
    if not resume:
        record_samples(current, "start")

    def checkpoint() -> Path:
        """Save the state after `progress.step` steps, unless the newest checkpoint holds it."""
        nonlocal saved_at
        if saved_at != progress.step:
            progress.elapsed_s = time.perf_counter() - clock
            ckpt.save(t, recorder, recipe, progress)
            saved_at = progress.step
        return ckpt.checkpoint_root(recorder.run_dir) / ckpt.step_name(progress.step)

    try:
        with recorder.live as live, ckpt.StopSignals() as signals:
            for step in range(progress.step, plan.total_steps):
                signum = signals.requested(t.accelerator)
                if signum is not None:
                    raise ckpt.RunInterrupted(signum, progress.step, checkpoint())
                t0 = time.perf_counter()
                result = train_step(t, plan, step)
                message = f"step {step + 1}: " + "; ".join(result.problems)
                if result.skipped and not result.overflow:
                    if recipe.train.on_nonfinite == "stop" or result.fatal:
                        if not result.fatal:
                            checkpoint()  # the state before the bad step: resume with on_nonfinite: skip
                        why = ("DeepSpeed applied the update before it could be checked" if result.fatal else
                               "train.on_nonfinite: stop; set it to skip to skip such steps")
                        raise NonFiniteError(f"{message} ({why})")
                progress.step = step + 1
                recorder.facts["steps_done"] = progress.step  # skipped steps included: the data position
                if result.skipped:
                    progress.skipped += 1
                    recorder.console.print(f"[yellow]skipped {escape(message)}[/]")
                else:
                    recorder.stats.merge(result.stats)
                    progress.tokens_seen += result.tokens
                    row = metrics_row(t, step + 1, result, time.perf_counter() - t0, time.perf_counter() - clock)
                    recorder.record_step(row, progress.tokens_seen, progress.skipped)
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
            finish(current, status, progress, wall)
        except Exception as exc:  # noqa: BLE001  never hide the error that ended the run
            if status == "complete":
                raise
            recorder.console.print(f"[yellow]could not record the end of the run: {escape(str(exc))}[/]")
    return recorder.run_dir
