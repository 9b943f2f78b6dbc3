"""The model side of a run: accelerator, student, optimizers, router and teacher source."""

from __future__ import annotations

import math
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from torch import nn
from peft import PeftModel
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from merge_distill import distributed as dist_mod
from merge_distill.data import SourceRows
from merge_distill.losses import DIVERGENCES
from merge_distill.models import load_student, merge_lora_state
from merge_distill.onpolicy import OnPolicy
from merge_distill.routing import build_router
from merge_distill.rowstore import row_pad_id
from merge_distill.routing.base import Router
from merge_distill.rundir import save_router
from merge_distill.schema import LoraSection, Recipe
from merge_distill.sources import LossSetup, SourceContext, TeacherSource, training_source
from merge_distill.vllm_engine import VLLMSampler


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
class Training:
    """Everything that computes or updates: what `train_step` needs, and checkpoints save."""

    accelerator: Accelerator
    world_size: int
    rank: int
    student: Any  # the prepared student (DDP or DeepSpeed engine, or the plain model)
    optimizer: Any
    scheduler: Any
    router: Router
    router_optimizer: torch.optim.Optimizer | None
    source: TeacherSource
    loss: LossSetup
    vocab_size: int
    max_grad_norm: float | None
    teacher_names: list[str]
    lora: LoraSection | None = None  # student.lora: the student is a PeftModel
    merge_lora: bool = False
    onpolicy: OnPolicy | None = None  # the recipe's onpolicy section, resolved (lmbda 0: never samples)
    live_source: TeacherSource | None = None  # cache.use + onpolicy.live_teachers: the teachers for sampled tokens
    fused_loss: bool = False  # train.fused_loss: the loss takes hidden states and the head, never [B, T, V] logits

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def save_student(self, out: Path, tokenizer: PreTrainedTokenizerBase) -> Path:
        """The student (and a learned router) as plain files; collective under ZeRO-3."""
        state = dist_mod.gather_student_state_dict(self.accelerator, self.student)
        if self.is_main:
            model: PreTrainedModel = dist_mod.unwrap(self.accelerator, self.student)
            if isinstance(model, PeftModel) and self.lora is not None:
                # the adapter alone (student/, loadable on its saved base), or the merged plain model
                # with the adapter beside it (student/adapter/)
                adapter_dir = out / "adapter" if self.merge_lora else out
                model.save_pretrained(adapter_dir, state_dict=state, safe_serialization=True)
                if self.merge_lora:
                    model.get_base_model().save_pretrained(out, state_dict=merge_lora_state(state, self.lora),
                                                           safe_serialization=True)
            else:
                model.save_pretrained(out, state_dict=state, safe_serialization=True)
            tokenizer.save_pretrained(out)
            if any(True for _ in self.router.parameters()):
                save_router(self.router, out.parent / "router.safetensors")
        return out


def live_source(recipe: Recipe, context: SourceContext) -> TeacherSource | None:
    """With cache.use, onpolicy.lmbda > 0 and onpolicy.live_teachers: the source the recipe
    would use without the cache (online, or aligned across tokenizers), which grades the
    on-policy micro-batches; None otherwise."""
    policy, cache = recipe.onpolicy, recipe.cache
    if not (policy.lmbda > 0 and policy.live_teachers and cache is not None and cache.use):
        return None
    live = recipe.model_copy(update={"cache": cache.model_copy(update={"use": False})})
    return training_source(live).build.for_training(live, context)


def vllm_sampler(recipe: Recipe, student: nn.Module, tokenizer: PreTrainedTokenizerBase,
                 world_size: int) -> VLLMSampler | None:
    """onpolicy.engine: vllm: the colocated engine, started from the recipe's student checkpoint (a
    student derived in the run is saved to the run folder first, for vLLM to read its shape)."""
    policy = recipe.onpolicy
    if policy.engine != "vllm" or policy.lmbda == 0:
        return None
    source = recipe.student.model
    if source is None:
        folder = Path(recipe.output.dir) / "vllm-student"
        student.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        source = str(folder)
    dtype = {"bf16": "bfloat16", "fp16": "float16"}.get(recipe.train.precision, "float32")
    return VLLMSampler(source, policy, dtype, recipe.data.seq_len + policy.max_new_tokens, tokenizer.eos_token_id,
                       len(tokenizer), student.config.vocab_size, distributed=world_size > 1)


def build_training(recipe: Recipe, accelerator: Accelerator, world_size: int, rank: int,
                   tokenizer: PreTrainedTokenizerBase, rows: list[SourceRows], total_steps: int) -> Training:
    r, dist = recipe.train, recipe.distributed
    vocab_size = len(tokenizer)
    # A pretrained student is partitioned as it loads under ZeRO-3; a derived one is built whole.
    init = dist_mod.student_init_context(accelerator, dist) if recipe.student.model is not None else nullcontext()
    with init:
        student = load_student(recipe)
    # Teachers first: a `self` teacher copies the student's initial weights before it is wrapped.
    context = SourceContext(accelerator, tokenizer, rows, student)
    source = training_source(recipe).build.for_training(recipe, context)
    live = live_source(recipe, context)
    router = build_router(recipe.routing, recipe.teacher_names, student.config.hidden_size).to(accelerator.device)
    router_params = list(router.parameters())
    router_optimizer = torch.optim.AdamW(router_params, lr=recipe.routing.lr) if router_params else None
    # only what trains (a LoRA student's adapters; every weight otherwise)
    optimizer = torch.optim.AdamW([p for p in student.parameters() if p.requires_grad], lr=r.lr,
                                  weight_decay=r.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(r.schedule, r.warmup_steps, total_steps))
    student, optimizer, scheduler = dist_mod.prepare_student(accelerator, dist, student, optimizer, scheduler)
    loss = LossSetup(DIVERGENCES.get(recipe.loss.kind).impl, recipe.loss, recipe.routing.blend, r.chunk_tokens)
    onpolicy = OnPolicy(recipe.onpolicy, r.seed, row_pad_id(tokenizer), tokenizer.eos_token_id, rank,
                        synced=world_size > 1 and dist.student_zero_stage == 3, vocab_size=vocab_size,
                        engine=vllm_sampler(recipe, dist_mod.unwrap(accelerator, student), tokenizer, world_size))
    return Training(accelerator, world_size, rank, student, optimizer, scheduler, router, router_optimizer, source,
                    loss, vocab_size, r.max_grad_norm, recipe.teacher_names, recipe.student.lora,
                    recipe.output.merge_lora, onpolicy, live, r.fused_loss)
