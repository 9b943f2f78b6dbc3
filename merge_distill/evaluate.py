"""Per-domain held-out perplexity of the student and of every teacher of a recipe.

Perplexity is token-weighted: exp(sum of gold NLL over all target tokens of a domain / their
count), never a mean of per-batch perplexities.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from merge_distill.data import build_rows
from merge_distill.errors import UserError
from merge_distill.models import DTYPES, load_model, load_tokenizer, tokenizer_source
from merge_distill.recipe import SELF_TEACHER
from merge_distill.signals import IGNORE_INDEX, per_token_stats, shift_targets

if TYPE_CHECKING:
    from merge_distill.recipe import Recipe


def eval_rows(recipe: "Recipe", tokenizer: PreTrainedTokenizerBase) -> dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
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


@torch.inference_mode()
def domain_nll(model: PreTrainedModel, rows: tuple[torch.Tensor, ...], vocab_size: int, batch_size: int = 8) -> tuple[float, int]:
    """(sum of gold NLL, number of target tokens) of `model` on one domain's rows."""
    ids, labels, mask = rows
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for start in range(0, len(ids), batch_size):
        sl = slice(start, start + batch_size)
        targets = shift_targets(labels[sl]).to(device)
        logits = model(input_ids=ids[sl].to(device), attention_mask=mask[sl].to(device), use_cache=False).logits
        nll, _, _ = per_token_stats(logits[..., :vocab_size], targets, with_top1=False)
        total += float(nll.double().sum())
        count += int((targets != IGNORE_INDEX).sum())
    return total, count


def evaluate_models(models: list[tuple[str, str, PreTrainedModel]], rows: dict, vocab_size: int) -> dict[str, Any]:
    """models: (label, kind, model) -> the eval.json structure."""
    domains = sorted(rows)
    result: dict[str, Any] = {"domains": domains, "rows": []}
    for label, kind, model in models:
        model.eval()
        entry: dict[str, Any] = {"model": label, "kind": kind, "ppl": {}, "nll": {}, "tokens": {}}
        for domain in domains:
            total, count = domain_nll(model, rows[domain], vocab_size)
            mean = total / max(count, 1)
            entry["nll"][domain], entry["ppl"][domain], entry["tokens"][domain] = mean, math.exp(mean), count
        result["rows"].append(entry)
    return result


def evaluate_recipe(recipe: "Recipe", student_dir: Path | None, teachers: bool = True) -> dict[str, Any]:
    """Evaluate a saved student (if given) and the recipe's teachers on data.eval."""
    source, revision, trust = tokenizer_source(recipe)
    tokenizer = load_tokenizer(str(student_dir) if student_dir else source, None if student_dir else revision, trust)
    rows = eval_rows(recipe, tokenizer)
    dtype = DTYPES[recipe.train.precision] if torch.cuda.is_available() else torch.float32
    device = "cuda" if torch.cuda.is_available() else "cpu"
    models: list[tuple[str, str, PreTrainedModel]] = []
    if student_dir is not None:
        models.append(("student", "student", load_model(str(student_dir), None, dtype, False, "student").to(device)))
    if teachers:
        for t in recipe.teachers:
            if t.model == SELF_TEACHER:
                if recipe.student.model is None:
                    continue  # a randomly initialised student has no meaningful "self" to evaluate
                model = load_model(recipe.student.model, recipe.student.revision, dtype, recipe.student.trust_remote_code, t.name)
            else:
                model = load_model(t.model, t.revision, dtype, t.trust_remote_code, f"teachers[{t.name}]")
            models.append((t.name, "teacher", model.to(device)))
    return evaluate_models(models, rows, len(tokenizer))
