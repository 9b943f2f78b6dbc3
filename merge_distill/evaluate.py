"""Per-domain held-out perplexity of the student and of every teacher of a recipe.

Perplexity is token-weighted: exp(sum of gold NLL over all target tokens of a domain / their
count), never a mean of per-batch perplexities.

Teachers come from the online teacher source, placed as in training (ZeRO-3 sharded under
DeepSpeed), so evaluating a teacher that only fits sharded works. Evaluation is data-parallel:
process r takes micro-batches r, r + N, r + 2N, ... of each domain, and the NLL sums and token
counts are summed over processes (float64). Under ZeRO-3 every process runs the same number
of teacher forwards (a forward is a collective): a process that has run out of batches repeats
its last one and discards the result.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from torch import nn
from transformers import PreTrainedTokenizerBase

from merge_distill import distributed as dist_mod
from merge_distill.data import build_rows
from merge_distill.errors import UserError
from merge_distill.models import DTYPES, load_model, load_tokenizer, tokenizer_source
from merge_distill.schema import SELF_TEACHER, Recipe
from merge_distill.signals import IGNORE_INDEX, TokenBatch, per_token_stats, shift_targets
from merge_distill.sources import OnlineTeachers, cross_tokenizer_teachers


def eval_rows(recipe: Recipe, tokenizer: PreTrainedTokenizerBase) -> dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """domain -> (input_ids, labels, attention_mask) [N, seq_len], capped at data.eval_tokens targets."""
    if not recipe.data.eval:
        raise UserError("data.eval: the recipe has no evaluation sources; add held-out files under data.eval")
    by_domain: dict[str, list] = {}
    for i, source in enumerate(recipe.data.eval):
        rows = build_rows(source, f"data.eval[{i}]", tokenizer, recipe.data.seq_len, recipe.data.packing)
        by_domain.setdefault(source.domain, []).append(rows)
    out = {}
    for domain, parts in by_domain.items():
        ids = torch.cat([p.input_ids for p in parts])
        labels = torch.cat([p.labels for p in parts])
        mask = torch.cat([p.attention_mask for p in parts])
        targets_per_row = (shift_targets(labels) != IGNORE_INDEX).sum(1).cumsum(0)
        keep = int((targets_per_row < recipe.data.eval_tokens).sum()) + 1
        out[domain] = (ids[:keep], labels[:keep], mask[:keep])
    return out


def my_batches(rows: tuple[torch.Tensor, ...], batch_size: int, world_size: int, rank: int) -> list[slice]:
    """This process's micro-batches of one domain: slices r, r + N, ... of batch_size rows."""
    n = len(rows[0])
    return [slice(s, min(n, s + batch_size)) for s in range(0, n, batch_size)][rank::world_size]


@torch.inference_mode()
def domain_nll(accelerator: Accelerator, student: nn.Module | None, teachers: OnlineTeachers | None,
               rows: tuple[torch.Tensor, ...], vocab_size: int, batch_size: int) -> tuple[list[float], int]:
    """(NLL sums [student?, teacher 1, ...], target tokens) of one domain, summed over processes."""
    ids, labels, mask = rows
    device = accelerator.device
    mine = my_batches(rows, batch_size, accelerator.num_processes, accelerator.process_index)
    rounds = dist_mod.global_max(accelerator, len(mine))  # teachers' forwards are collective under ZeRO-3
    width = (student is not None) + (len(teachers.names) if teachers else 0)
    sums = torch.zeros(width + 1, dtype=torch.float64)  # [..., tokens]
    for i in range(rounds):
        sl = mine[min(i, len(mine) - 1)] if mine else slice(0, min(batch_size, len(ids)))
        batch = TokenBatch(ids[sl].to(device), mask[sl].to(device), labels[sl].to(device), [], [])
        targets = batch.targets
        parts = []
        if student is not None:
            logits = student(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False).logits
            nll, _, _ = per_token_stats(logits[..., :vocab_size], targets, with_top1=False)
            parts.append(nll.double().sum().cpu())
        if teachers is not None:
            parts.extend(teachers.signals(batch).gold_nll.double().sum(dim=(0, 1)).cpu().unbind())
        if i < len(mine):  # a repeated batch only keeps the collectives in step
            sums += torch.stack([*parts, torch.tensor(float((targets != IGNORE_INDEX).sum()), dtype=torch.float64)])
    total = dist_mod.all_reduce_sum(accelerator, sums.to(device)).cpu()
    return total[:-1].tolist(), int(total[-1])


def evaluate_models(accelerator: Accelerator, student: nn.Module | None, teachers: OnlineTeachers | None,
                    rows: dict, vocab_size: int, batch_size: int) -> dict[str, Any]:
    """-> the eval.json structure: one entry per model (student first), per domain nll/ppl/tokens."""
    domains = sorted(rows)
    labels = (["student"] if student is not None else []) + (list(teachers.names) if teachers else [])
    kinds = (["student"] if student is not None else []) + ["teacher"] * (len(labels) - (student is not None))
    entries = [{"model": label, "kind": kind, "ppl": {}, "nll": {}, "tokens": {}} for label, kind in zip(labels, kinds)]
    if student is not None:
        student.eval()
    for domain in domains:
        totals, count = domain_nll(accelerator, student, teachers, rows[domain], vocab_size, batch_size)
        for entry, total in zip(entries, totals):
            mean = total / max(count, 1)
            entry["nll"][domain], entry["ppl"][domain], entry["tokens"][domain] = mean, math.exp(mean), count
    return {"domains": domains, "rows": entries}


def eval_teacher_names(recipe: Recipe) -> list[str]:
    """The teachers evaluation runs: all but a `self` teacher of a randomly initialised student
    (which has no meaningful initial weights to evaluate) and teachers with another tokenizer
    (their perplexity is per token of another vocabulary; bits per byte is issue 13's next part)."""
    cross = set(cross_tokenizer_teachers(recipe))
    return [t.name for t in recipe.teachers
            if not (t.model == SELF_TEACHER and recipe.student.model is None) and t.name not in cross]


def _self_weights(recipe: Recipe, names: list[str]) -> nn.Module | None:
    """The student's initial weights, for a `self` teacher (the recipe's student.model)."""
    if not any(t.model == SELF_TEACHER and t.name in names for t in recipe.teachers):
        return None
    spec = recipe.student
    return load_model(spec.model, spec.revision, torch.float32, spec.trust_remote_code, "student.model")  # type: ignore[arg-type]


def load_saved_student(recipe: Recipe, accelerator: Accelerator, student_dir: Path) -> tuple[nn.Module, PreTrainedTokenizerBase]:
    """A saved student and its tokenizer, whole on this process (students are the small model)."""
    dtype = torch.float32 if accelerator.device.type == "cpu" else DTYPES[recipe.train.precision]
    model = load_model(str(student_dir), None, dtype, False, "student").to(accelerator.device)
    return model, load_tokenizer(str(student_dir))


def evaluate_run(recipe: Recipe, accelerator: Accelerator, student: nn.Module | None,
                 tokenizer: PreTrainedTokenizerBase | None = None, teachers: bool = True) -> dict[str, Any]:
    """Evaluate a student (if given: the in-memory one at the end of training, or one from
    load_saved_student) and the recipe's teachers on data.eval, on every process of the launch.
    Teachers load through the online source; the result is the same on every process."""
    tokenizer = tokenizer or load_tokenizer(*tokenizer_source(recipe))
    rows = eval_rows(recipe, tokenizer)
    vocab_size = len(tokenizer)
    names = eval_teacher_names(recipe) if teachers else []
    source = OnlineTeachers.open(recipe, accelerator, vocab_size, _self_weights(recipe, names), names) if names else None
    return evaluate_models(accelerator, student, source, rows, vocab_size, recipe.train.micro_batch_size)
