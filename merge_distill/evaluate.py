"""Per-domain held-out bits per byte and perplexity of the student and of every teacher of a recipe.

Bits per byte = sum of NLL (nats) over a model's own tokens of the domain's text / (their bytes
x ln 2): the one unit that compares models with different tokenizers. Every model reads the same
text (the student's rows); a teacher with another tokenizer reads it with its own tokens.
Perplexity is token-weighted, exp(sum of gold NLL over all target tokens of a domain / their
count), never a mean of per-batch perplexities, and is reported for the models that share the
student's tokenizer (per token of another vocabulary it would not compare).

Teachers come from the online teacher source, placed as in training (ZeRO-3 sharded under
DeepSpeed), so evaluating a teacher that only fits sharded works. Evaluation is data-parallel:
process r takes micro-batches r, r + N, r + 2N, ... of each domain, and the NLL sums and token
counts are summed over processes (float64). Under ZeRO-3 every process runs the same number
of teacher forwards (a forward is a collective): a process that has run out of batches repeats
its last one and discards the result.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from peft import AutoPeftModelForCausalLM
from accelerate import Accelerator
from torch import nn
from transformers import PreTrainedTokenizerBase

from merge_distill import distributed as dist_mod
from merge_distill.data import SourceRows
from merge_distill.plan import source_rows
from merge_distill.errors import UserError
from merge_distill.models import DTYPES, cross_tokenizer_teachers, load_model, load_tokenizer, tokenizer_source
from merge_distill.schema import SELF_TEACHER, Recipe
from merge_distill.signals import IGNORE_INDEX, TokenBatch, per_token_stats
from merge_distill.align import TokenBytes
from merge_distill.sources import AlignedTeachers, OnlineTeachers


def eval_rows(recipe: Recipe, tokenizer: PreTrainedTokenizerBase) -> dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """domain -> (input_ids, labels, attention_mask) [N, seq_len], capped at data.eval_tokens targets."""
    if not recipe.data.eval:
        raise UserError("data.eval: the recipe has no evaluation sources; add held-out files under data.eval")
    by_domain: dict[str, list[SourceRows]] = {}
    for source, rows in zip(recipe.data.eval, source_rows(recipe, tokenizer, "eval")):
        by_domain.setdefault(source.domain, []).append(rows)
    out = {}
    for domain, parts in by_domain.items():
        targets_per_row = torch.from_numpy(np.concatenate([p.targets() for p in parts])).cumsum(0)
        keep = int((targets_per_row < recipe.data.eval_tokens).sum()) + 1
        taken = []
        for part in parts:  # only the rows kept are read from the store
            taken.append(part.take(slice(0, min(keep, len(part)))))
            keep -= len(part)
            if keep <= 0:
                break
        out[domain] = tuple(torch.cat([getattr(t, name) for t in taken]) for name in ("input_ids", "labels", "attention_mask"))
    return out


def my_batches(rows: tuple[torch.Tensor, ...], batch_size: int, world_size: int, rank: int) -> list[slice]:
    """This process's micro-batches of one domain: slices r, r + N, ... of batch_size rows."""
    n = len(rows[0])
    return [slice(s, min(n, s + batch_size)) for s in range(0, n, batch_size)][rank::world_size]


@dataclass
class EvalModels:
    """What one evaluation runs: the student (optional), teachers that share its tokenizer (online
    source), teachers with another tokenizer (aligned source), and the student's token bytes
    (None when its tokenizer family gives no bytes: then no bits per byte)."""

    student: nn.Module | None
    online: OnlineTeachers | None
    aligned: AlignedTeachers | None
    student_bytes: TokenBytes | None

    def labels(self) -> list[tuple[str, str, bool]]:
        """(label, kind, shares the student's tokenizer) in row order."""
        out = [("student", "student", True)] if self.student is not None else []
        out += [(n, "teacher", True) for n in (self.online.names if self.online else [])]
        return out + [(n, "teacher", False) for n in (self.aligned.names if self.aligned else [])]


@torch.inference_mode()
def domain_sums(accelerator: Accelerator, models: EvalModels, rows: tuple[torch.Tensor, ...], vocab_size: int,
                batch_size: int) -> torch.Tensor:
    """[models, 4] float64 for one domain, summed over processes: NLL (nats) over all target tokens,
    their number, NLL over the tokens that spell text (special tokens such as EOS spell none), and
    those tokens' bytes (nan without the student's token bytes)."""
    ids, labels, mask = rows
    device = accelerator.device
    mine = my_batches(rows, batch_size, accelerator.num_processes, accelerator.process_index)
    rounds = dist_mod.global_max(accelerator, len(mine))  # teachers' forwards are collective under ZeRO-3
    sums = torch.zeros(len(models.labels()), 4, dtype=torch.float64)
    for i in range(rounds):
        sl = mine[min(i, len(mine) - 1)] if mine else slice(0, min(batch_size, len(ids)))
        batch = TokenBatch(ids[sl].to(device), mask[sl].to(device), labels[sl].to(device), [], [])
        targets = batch.targets
        valid = targets != IGNORE_INDEX
        if models.student_bytes is not None:
            lengths = torch.tensor([[len(p) for p in models.student_bytes(row.tolist())]
                                    for row in targets.clamp(min=0).cpu()], dtype=torch.float64).to(device)
            text = valid & (lengths > 0)
            nbytes = float(lengths[text].sum())
        else:
            text, nbytes = valid, math.nan

        def row(nll: torch.Tensor) -> torch.Tensor:  # nll [B, T] -> the four sums
            nll = nll.double()
            return torch.tensor([float(nll[valid].sum()), float(valid.sum()), float(nll[text].sum()), nbytes],
                                dtype=torch.float64)

        parts = []
        if models.student is not None:
            logits = models.student(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                                    use_cache=False).logits
            parts.append(row(per_token_stats(logits[..., :vocab_size], targets, with_top1=False)[0]))
        if models.online is not None:
            parts.extend(row(nll) for nll in models.online.signals(batch).gold_nll.unbind(-1))
        if models.aligned is not None:
            for total, count, nbytes_own in models.aligned.text_nll(batch).tolist():
                parts.append(torch.tensor([total, count, total, nbytes_own], dtype=torch.float64))
        if i < len(mine):  # a repeated batch only keeps the collectives in step
            sums += torch.stack(parts)
    return dist_mod.all_reduce_sum(accelerator, sums.to(device)).cpu()


def evaluate_models(accelerator: Accelerator, models: EvalModels, rows: dict, vocab_size: int,
                    batch_size: int) -> dict[str, Any]:
    """-> the eval.json structure: one entry per model (student first), per domain: bits per byte
    (every model, each on its own tokens of the same text); nll / ppl / tokens for the models that
    share the student's tokenizer (per token of another vocabulary they would not compare)."""
    domains = sorted(rows)
    entries = [{"model": label, "kind": kind, "ppl": {}, "nll": {}, "tokens": {}, "bpb": {}}
               for label, kind, _ in models.labels()]
    if models.student is not None:
        models.student.eval()
    for domain in domains:
        sums = domain_sums(accelerator, models, rows[domain], vocab_size, batch_size)
        for entry, (label, kind, shared), (total, count, text_nll, nbytes) in zip(entries, models.labels(), sums.tolist()):
            if shared:
                mean = total / max(count, 1)
                entry["nll"][domain], entry["ppl"][domain], entry["tokens"][domain] = mean, math.exp(mean), int(count)
            if math.isfinite(nbytes) and nbytes > 0:
                entry["bpb"][domain] = text_nll / (nbytes * math.log(2))
    return {"domains": domains, "rows": entries}


def eval_teacher_names(recipe: Recipe) -> list[str]:
    """The teachers evaluation runs: all but a `self` teacher of a randomly initialised student
    (which has no meaningful initial weights to evaluate)."""
    return [t.name for t in recipe.teachers if not (t.model == SELF_TEACHER and recipe.student.model is None)]


def _self_weights(recipe: Recipe, names: list[str]) -> nn.Module | None:
    """The student's initial weights, for a `self` teacher (the recipe's student.model)."""
    if not any(t.model == SELF_TEACHER and t.name in names for t in recipe.teachers):
        return None
    spec = recipe.student
    return load_model(spec.model, spec.revision, torch.float32, spec.trust_remote_code, "student.model")  # type: ignore[arg-type]


def load_saved_student(recipe: Recipe, accelerator: Accelerator, student_dir: Path) -> tuple[nn.Module, PreTrainedTokenizerBase]:
    """A saved student and its tokenizer, whole on this process (students are the small model)."""
    dtype = torch.float32 if accelerator.device.type == "cpu" else DTYPES[recipe.train.precision]
    if (student_dir / "adapter_config.json").is_file():  # a LoRA adapter on its saved base: merged for evaluation
        model = AutoPeftModelForCausalLM.from_pretrained(str(student_dir), dtype=dtype).merge_and_unload()
        return model.eval().to(accelerator.device), load_tokenizer(str(student_dir))
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
    cross = set(cross_tokenizer_teachers(recipe))
    shared, other = [n for n in names if n not in cross], [n for n in names if n in cross]
    online = OnlineTeachers.open(recipe, accelerator, vocab_size, _self_weights(recipe, shared), shared) if shared else None
    aligned = AlignedTeachers.open(recipe, accelerator, tokenizer, None, other) if other else None
    try:
        student_bytes: TokenBytes | None = TokenBytes(tokenizer)
    except UserError:
        student_bytes = None  # a tokenizer family without token bytes: perplexity only
    models = EvalModels(student, online, aligned, student_bytes)
    return evaluate_models(accelerator, models, rows, vocab_size, recipe.train.micro_batch_size)
