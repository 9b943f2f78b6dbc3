"""Checks across recipe sections, against the files a recipe names, and before a run starts.

Each check returns one-line problems that start with the key path; `load_recipe` reports them
all at once (`cross_checks`). `preflight` adds every check `run` makes before its first step
(the run directory, --resume, the tokenized data, the student's initialisation, the teacher
cache), without loading a model: `merge-distill validate` runs it, so a recipe that validates
never fails at start for a reason validate could have seen.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from transformers import AutoConfig

from merge_distill.cache.manifest import full_manifest, recipe_problems
from merge_distill.checkpoint import check_resumable
from merge_distill.data import SourceRows, source_files
from merge_distill.errors import UserError
from merge_distill.evaluate import eval_rows
from merge_distill.onpolicy import ON_POLICY_PROVIDES, last_run_start, prompt_of
from merge_distill.models import (
    TOKENIZER_FILES,
    aligned_teachers,
    cross_tokenizer_teachers,
    damaged_weights,
    layer_problems,
    linear_module_names,
    load_tokenizer,
    override_problems,
    tokenizer_source,
)
from merge_distill.plan import training_rows
from merge_distill.routing import ROUTERS
from merge_distill.rundir import run_dir_problems
from merge_distill.schema import SELF_TEACHER, Recipe, looks_local
from merge_distill.signals import IGNORE_INDEX, shift_targets
from merge_distill.align import TokenBytes, align_row, special_counterparts, tokenizer_family
from merge_distill.sources import needs_problems
from merge_distill.streaming import StreamRows
from merge_distill.trackers import tracker_problems


def cross_checks(recipe: Recipe, check_files: bool = True) -> list[str]:
    problems = _names(recipe)
    problems += recipe.routing.check(recipe.teacher_names, recipe.train_domains)
    problems += recipe.distributed.check()
    problems += tracker_problems(recipe)
    problems += _streaming(recipe)
    problems += _on_policy(recipe)
    problems += _vllm_engine(recipe)
    problems += _fused_loss(recipe)
    if recipe.loss.hard_label_weight == 1.0 and recipe.routing.kind != "uniform":
        problems.append(
            "loss.hard_label_weight is 1.0 (plain cross-entropy, teachers unused) but routing.kind is "
            f"{recipe.routing.kind!r}; use routing.kind: uniform or lower hard_label_weight"
        )
    if check_files:
        problems += _model_paths(recipe)
        problems += _data_paths(recipe)
        if not problems:
            problems += _context_lengths(recipe)
            problems += tokenizer_problems(recipe)
            problems += _hidden_store(recipe)
    problems += needs_problems(recipe, recipe.routing.kind, ROUTERS.get(recipe.routing.kind).impl.needs)
    problems += recipe_problems(recipe, check_files and not problems)  # cache.use: manifest (cheap fields)
    return problems


def _streaming(recipe: Recipe) -> list[str]:
    """What a streamed source cannot do: be counted (epochs) or be read by row index (the cache)."""
    problems = []
    for i, source in enumerate(recipe.data.train):
        if not source.streaming:
            continue
        if recipe.train.steps is None:
            problems.append(f"data.train[{i}].streaming: a stream's length is unknown until it ends, so "
                            "train.epochs cannot be turned into steps; give train.steps instead")
        if recipe.cache is not None:
            problems.append(f"data.train[{i}].streaming: the teacher cache stores rows by their index in a "
                            "stored corpus, which a stream does not have; set streaming: false (the rows are "
                            "then stored once, docs/DATA.md) or remove the cache section")
    return problems


def _on_policy(recipe: Recipe) -> list[str]:
    """What on-policy steps (onpolicy.lmbda > 0) cannot work with: a cache (nobody stored the
    teachers' view of tokens the student samples during the run), no teachers (hard label only:
    sampled tokens have no gold label), a router that needs what sampled tokens do not give."""
    if recipe.onpolicy.lmbda == 0:
        return []
    problems = []
    if recipe.cache is not None and recipe.cache.use and not recipe.onpolicy.live_teachers:
        problems.append(f"onpolicy.lmbda: {recipe.onpolicy.lmbda:g} samples tokens during the run, which no offline "
                        "cache holds, and cache.use: true loads no teacher to grade them; set onpolicy.live_teachers: "
                        "true (the teachers are loaded for the on-policy micro-batches, the others read the cache), "
                        "or cache.use: false")
    if recipe.loss.hard_label_weight == 1.0:
        problems.append("onpolicy.lmbda: on-policy tokens are graded by the teachers only (a sampled token is no gold "
                        "label), but loss.hard_label_weight is 1.0 (teachers unused); lower hard_label_weight")
    needs = ROUTERS.get(recipe.routing.kind).impl.needs
    missing = sorted(needs - ON_POLICY_PROVIDES)
    if missing:
        problems.append(f"onpolicy.lmbda: routing.kind {recipe.routing.kind!r} needs {', '.join(missing)}, which the "
                        f"student's sampled tokens do not give (they give {', '.join(sorted(ON_POLICY_PROVIDES))}); "
                        "choose another router or onpolicy.lmbda: 0")
    return problems


def _vllm_engine(recipe: Recipe) -> list[str]:
    """onpolicy.engine: vllm needs the vllm package and a CUDA GPU, and gets the student's weights as
    they are: not a LoRA adapter or ZeRO-3 partitions."""
    if recipe.onpolicy.engine != "vllm":
        return []
    problems = []
    missing = _vllm_missing()
    if missing:
        problems.append(f"onpolicy.engine: vllm needs the vllm package, which does not import here ({missing}); "
                        "pip install vllm, or use onpolicy.engine: hf")
    elif not torch.cuda.is_available():
        problems.append("onpolicy.engine: vllm runs on a CUDA GPU and none is visible; use onpolicy.engine: hf")
    if recipe.student.lora is not None:
        problems.append("onpolicy.engine: vllm takes the student's full weights, but student.lora trains an adapter; "
                        "use onpolicy.engine: hf or remove student.lora")
    if recipe.distributed.student_zero_stage == 3:
        problems.append("onpolicy.engine: vllm takes the student's full weights, but distributed.student_zero_stage 3 "
                        "partitions them; use onpolicy.engine: hf or student_zero_stage <= 2")
    return problems


def _vllm_missing() -> str:
    """Why vllm does not import ("" when it does). Imported only for a recipe that asks for it."""
    try:
        import vllm  # noqa: F401
    except Exception as exc:  # noqa: BLE001 -- a broken install is as unusable as a missing one
        return f"{type(exc).__name__}: {exc}"
    return ""


def _hidden_store(recipe: Recipe) -> list[str]:
    """cache.store: hidden stores hidden states in the student's vocabulary's head: every teacher
    must share the student's tokenizer (auto falls back to topk instead)."""
    if recipe.cache is None or recipe.cache.store != "hidden":
        return []
    aligned = aligned_teachers(recipe)
    if not aligned:
        return []
    return [f"cache.store: hidden needs every teacher on the student's tokenizer, but {', '.join(map(repr, aligned))} "
            "has another (its top-k is stored in its own vocabulary); set cache.store: topk or auto"]


def _fused_loss(recipe: Recipe) -> list[str]:
    """What train.fused_loss does not cover yet: a ZeRO-3 student (its head is partitioned outside
    the forward), on-policy micro-batches."""
    if not recipe.train.fused_loss:
        return []
    problems = []
    if recipe.distributed.student_zero_stage == 3:
        problems.append("train.fused_loss: a ZeRO-3 student's head is partitioned outside its forward; use "
                        "distributed.student_zero_stage <= 2 or train.fused_loss: false")
    if recipe.onpolicy.lmbda > 0:
        problems.append("train.fused_loss: on-policy micro-batches read the student's logits for their report; set "
                        "onpolicy.lmbda: 0 or train.fused_loss: false")
    return problems


def on_policy_problems(recipe: Recipe, rows: list[SourceRows], probe: int = 256) -> list[str]:
    """Checks that need the tokenized rows: every training source gives prompts (among its first
    `probe` rows), and the longest prompt it can give plus max_new_tokens fits every local model's
    context (chat rows: up to seq_len - 1 prompt tokens; text rows: prompt_tokens)."""
    policy = recipe.onpolicy
    if policy.lmbda == 0:
        return []
    problems = []
    longest = 0
    for i, source in enumerate(rows):
        head = source.take(range(probe if isinstance(source, StreamRows) else min(probe, len(source))))
        starts = [last_run_start(head.attention_mask[b], head.labels[b]) for b in range(len(head.input_ids))]
        given = [b for b in range(len(starts))
                 if prompt_of(head.input_ids[b], head.attention_mask[b], head.labels[b], policy.prompt_tokens) is not None]
        if not given:
            problems.append(f"data.train[{i}]: none of its first {len(starts)} rows gives an on-policy prompt (text rows "
                            f"need onpolicy.prompt_tokens = {policy.prompt_tokens} tokens; chat rows an assistant turn); "
                            "lower onpolicy.prompt_tokens or give this source longer examples")
            continue
        chat = any(start is not None and start > 0 for start in starts)
        longest = max(longest, recipe.data.seq_len - 1 if chat else policy.prompt_tokens)
    for label, path in model_dirs(recipe):
        limit = json.loads((Path(path) / "config.json").read_text()).get("max_position_embeddings")
        if isinstance(limit, int) and longest + policy.max_new_tokens > limit:
            problems.append(f"onpolicy.max_new_tokens: prompts of up to {longest} tokens plus {policy.max_new_tokens} "
                            f"sampled tokens exceed the {limit}-token context of {label} ({path}); use "
                            f"onpolicy.max_new_tokens <= {max(limit - longest, 0)} or shorter prompts")
    return problems


def _collect(check, *args) -> tuple[object, list[str]]:
    """(result, []) or (None, the UserError's problems)."""
    try:
        return check(*args), []
    except UserError as exc:
        return None, exc.problems


def lora_problems(recipe: Recipe, config) -> list[str]:
    """student.lora against the student's config: target modules it has; a base saved somewhere."""
    spec = recipe.student
    if spec.lora is None:
        return ["output.merge_lora is true but the student has no lora section; add student.lora or remove "
                "output.merge_lora"] if recipe.output.merge_lora else []
    problems = []
    if spec.model is None and not recipe.output.merge_lora:
        problems.append("student.lora: the student's base is built from a teacher (from_teacher / from_config) and is "
                        "saved nowhere, so an adapter alone could not be loaded; set output.merge_lora: true")
    names = linear_module_names(config)
    missing = [m for m in spec.lora.target_modules if m not in names]
    if missing:
        problems.append(f"student.lora.target_modules: {missing} are not linear layers of the student; it has "
                        f"{names}")
    return problems


def student_problems(recipe: Recipe) -> list[str]:
    """What `load_student` would refuse, read from configs alone (no weights loaded): the config the
    student is built from is read once, for the layer, override and LoRA checks."""
    spec = recipe.student
    lora = spec.lora is not None or recipe.output.merge_lora
    if spec.from_teacher is not None:
        source = next(t for t in recipe.teachers if t.name == spec.from_teacher.teacher)
        path, revision, key = source.model, source.revision, "student.from_teacher"
    elif spec.from_config is not None:
        path = next((t.model for t in recipe.teachers if t.name == spec.from_config.base), spec.from_config.base)
        revision, key = None, "student.from_config.base"
    elif lora:
        path, revision, key = spec.model, spec.revision, "student"
    else:
        return []  # a pretrained student without LoRA: its files are checked elsewhere
    try:
        config = AutoConfig.from_pretrained(path, revision=revision)
    except (OSError, ValueError) as exc:
        return [f"{key}: cannot read a config from {path!r}: {exc}"]
    found = lora_problems(recipe, config) if lora else []
    if found:
        return found
    if spec.from_teacher is not None:
        layers = getattr(config, "num_hidden_layers", None)
        return layer_problems(spec.from_teacher.layers, layers) if layers is not None else []
    if spec.from_config is not None:
        return override_problems(config, spec.from_config.overrides)
    return []


def weight_problems(recipe: Recipe) -> list[str]:
    """Local model folders whose safetensors files are corrupt or truncated (headers and slices
    read, no tensor loaded), in the words load_model uses."""
    models = [(f"teachers[{t.name}]", t.model) for t in recipe.teachers if _is_local(t.model)]
    if recipe.student.model and _is_local(recipe.student.model):
        models.append(("student.model", recipe.student.model))
    problems = []
    for label, folder in models:
        damaged = damaged_weights(Path(folder))
        if damaged:
            problems.append(f"{label}: {damaged}; copy or download the model again")
    return problems


def preflight(recipe: Recipe, overwrite: bool = False, resume: bool = False, world_size: int = 1) -> list[str]:
    """Every check `run` makes before its first step, for a recipe that passed `load_recipe`."""
    problems = run_dir_problems(Path(recipe.output.dir), overwrite, resume)
    if resume and not problems:
        problems += _collect(check_resumable, Path(recipe.output.dir), recipe, world_size)[1]
    problems += student_problems(recipe)
    problems += weight_problems(recipe)
    tokenizer = load_tokenizer(*tokenizer_source(recipe))
    rows, found = _collect(training_rows, recipe, tokenizer)
    problems += found
    if rows is not None:
        problems += on_policy_problems(recipe, rows)  # type: ignore[arg-type]
    if recipe.data.eval and recipe.report.eval_at_end:
        problems += _collect(eval_rows, recipe, tokenizer)[1]
    if recipe.cache is not None and recipe.cache.k > len(tokenizer):
        problems.append(f"cache.k is {recipe.cache.k} but the vocabulary has {len(tokenizer)} tokens; "
                        f"use at most {len(tokenizer)}")
    if rows is not None and recipe.cache is not None and recipe.cache.use:
        problems += recipe_problems(recipe, True, expected=full_manifest(recipe, tokenizer, rows))  # type: ignore[arg-type]
    return problems


def _names(recipe: Recipe) -> list[str]:
    problems: list[str] = []
    seen: dict[str, int] = {}
    for i, teacher in enumerate(recipe.teachers):
        if teacher.name in seen:
            problems.append(
                f"teachers[{i}].name: {teacher.name!r} is already used by teachers[{seen[teacher.name]}]; "
                "give every teacher a unique name"
            )
        seen.setdefault(teacher.name, i)
    selfs = [i for i, t in enumerate(recipe.teachers) if t.model == SELF_TEACHER]
    if len(selfs) > 1:
        problems.append(f"teachers: {len(selfs)} teachers use model: self; one frozen copy of the student is enough")
    init = recipe.student.from_teacher
    if init is not None:
        names = [t.name for t in recipe.teachers if t.model != SELF_TEACHER]
        if init.teacher not in names:
            problems.append(
                f"student.from_teacher.teacher: {init.teacher!r} is not a teacher loaded from a model; "
                f"choose one of: {', '.join(names) or '(none)'}"
            )
    labels = [s.label for s in recipe.data.train]
    for dup in sorted({x for x in labels if labels.count(x) > 1}):
        problems.append(f"data.train: two sources are named {dup!r}; give each a distinct `name`")
    return problems


def _is_local(model: str) -> bool:
    return model != SELF_TEACHER and (looks_local(model) or Path(model).exists())


def _model_paths(recipe: Recipe) -> list[str]:
    problems: list[str] = []
    refs = [(f"teachers[{i}].model", t.model) for i, t in enumerate(recipe.teachers)]
    if recipe.student.model:
        refs.append(("student.model", recipe.student.model))
    if recipe.student.from_config and recipe.student.from_config.base not in recipe.teacher_names:
        refs.append(("student.from_config.base", recipe.student.from_config.base))
    for key, model in refs:
        if not _is_local(model):
            continue
        path = Path(model)
        if not path.exists():
            problems.append(f"{key}: {model} does not exist; give a model directory (with config.json) or a hub id")
        elif not (path / "config.json").is_file():
            problems.append(f"{key}: {model} has no config.json; point it at a saved Hugging Face model directory")
        else:
            try:
                json.loads((path / "config.json").read_text(encoding="utf-8"))
            except (ValueError, UnicodeDecodeError) as exc:
                problems.append(f"{key}: {path / 'config.json'} is not valid JSON ({str(exc).splitlines()[0]}); "
                                "the model folder is damaged: copy or download it again")
    return problems


def _data_paths(recipe: Recipe) -> list[str]:
    problems: list[str] = []
    for section in ("train", "eval"):
        for i, source in enumerate(getattr(recipe.data, section)):
            if source.type != "hub" and not source_files(source.path):
                problems.append(
                    f"data.{section}[{i}].path: {source.path} matches no file; check the path "
                    "(relative paths start from the recipe's folder)"
                )
    return problems


def model_dirs(recipe: Recipe) -> list[tuple[str, str]]:
    """(label, local dir) of every model whose tokenizer the run uses."""
    dirs = [(f"teacher {t.name!r}", t.model) for t in recipe.teachers if _is_local(t.model)]
    if recipe.student.model and _is_local(recipe.student.model):
        dirs.append(("student", recipe.student.model))
    return dirs


def _context_lengths(recipe: Recipe) -> list[str]:
    problems = []
    for label, path in model_dirs(recipe):
        config = json.loads((Path(path) / "config.json").read_text())
        limit = config.get("max_position_embeddings")
        if isinstance(limit, int) and recipe.data.seq_len > limit:
            problems.append(
                f"data.seq_len: {recipe.data.seq_len} is beyond the {limit}-token context of {label} ({path}); "
                f"use data.seq_len <= {limit}"
            )
    return problems




def tokenizer_problems(recipe: Recipe) -> list[str]:
    """Every local model's tokenizer loads. A teacher whose tokenizer differs from the student's is
    aligned across tokenizers: then its tokenizer and the student's must give the bytes of their
    tokens (align/token_bytes.py), and no offline cache can stand in for it yet."""
    for label, path in model_dirs(recipe):
        if not any((Path(path) / name).is_file() for name in TOKENIZER_FILES):
            return [f"{label}: {path} holds no tokenizer (none of {', '.join(TOKENIZER_FILES)}); save the model's "
                    "tokenizer next to it (tokenizer.save_pretrained(folder))"]
        try:
            load_tokenizer(path)
        except Exception as exc:  # a broken tokenizer is the user's file: report it, don't crash
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            return [f"{label}: cannot load the tokenizer in {path}: {first}; the tokenizer files are damaged: "
                    "save the model's tokenizer there again"]
    cross = cross_tokenizer_teachers(recipe)
    if not cross and not recipe.align.force:
        return []
    problems = []
    student = load_tokenizer(*tokenizer_source(recipe))
    checks = [("student", student)] + [(f"teachers[{t.name}]", load_tokenizer(t.model, t.revision, t.trust_remote_code))
                                       for t in recipe.teachers if t.name in cross]
    for label, tokenizer in checks:
        try:
            problems += TokenBytes(tokenizer).check(label)
        except UserError as exc:
            problems += [f"{label}: {p}" for p in exc.problems]
    return problems


COVERAGE_ROWS = 32  # rows per training source that `validate` aligns to measure coverage


def alignment_coverage(student: TokenBytes, teacher: TokenBytes, rows: list[SourceRows],
                       max_rows: int = COVERAGE_ROWS) -> dict[str, tuple[int, int]]:
    """domain -> (the student's target positions aligned with a teacher position, all target
    positions), over the first `max_rows` rows of each source: what the report's "aligned" share
    will be, known before any model is loaded."""
    counterparts = special_counterparts(student, teacher)
    counts: dict[str, tuple[int, int]] = {}
    for source in rows:
        aligned = total = 0
        head = source.take(slice(0, max_rows))
        for i in range(len(head.input_ids)):
            keep = head.attention_mask[i].bool()
            has_target = (shift_targets(head.labels[i: i + 1])[0][keep] != IGNORE_INDEX).tolist()
            row = align_row(head.input_ids[i][keep].tolist(), student, teacher, counterparts)
            aligned += sum(1 for t, target in enumerate(has_target) if target and row.to_teacher[t] >= 0)
            total += sum(has_target)
        before = counts.get(source.domain, (0, 0))
        counts[source.domain] = (before[0] + aligned, before[1] + total)
    return counts


def alignment_summary(recipe: Recipe) -> list[str]:
    """One line per teacher that is aligned across tokenizers: how, and on what share of the
    student's target positions of the training data (for `validate`)."""
    cross = set(cross_tokenizer_teachers(recipe))
    cached = recipe.cache is not None and recipe.cache.use
    k = recipe.cache.k if recipe.cache is not None and cached else recipe.align.k
    where = "read from the cache (stored in its own vocabulary) and " if cached else ""
    wanted = [t for t in recipe.teachers if t.name in cross or (recipe.align.force and t.model != SELF_TEACHER)]
    if not wanted:
        return []
    student_tokenizer = load_tokenizer(*tokenizer_source(recipe))
    student = TokenBytes(student_tokenizer)
    rows, _ = _collect(training_rows, recipe, student_tokenizer)  # problems there are preflight's to report
    lines = []
    for t in wanted:
        tokenizer = load_tokenizer(t.model, t.revision, t.trust_remote_code) if t.name in cross else student_tokenizer
        what = "another tokenizer" if t.name in cross else "the student's tokenizer, forced (align.force)"
        line = (f"teacher {t.name!r} uses {what} ({tokenize_family_name(tokenizer)}, {len(tokenizer)} tokens): "
                f"aligned through byte offsets, its top-{k} {where}projected into the student's vocabulary")
        if rows:
            counts = alignment_coverage(student, TokenBytes(tokenizer), rows)  # type: ignore[arg-type]
            aligned, total = (sum(c[i] for c in counts.values()) for i in (0, 1))
            domains = ", ".join(f"{d} {a / max(n, 1):.1%}" for d, (a, n) in counts.items())
            line += (f"; aligned at {aligned / max(total, 1):.1%} of the student's target positions ({domains}; "
                     f"first {COVERAGE_ROWS} rows of each source)")
        lines.append(line)
    return lines


def tokenize_family_name(tokenizer) -> str:
    return {"byte_level": "byte-level BPE", "sentencepiece": "SentencePiece"}[tokenizer_family(tokenizer)]
