"""Checks across recipe sections, and against the files a recipe names.

Each check returns one-line problems that start with the key path; `load_recipe` reports them
all at once.
"""

from __future__ import annotations

import glob
import json
from pathlib import Path
from typing import TYPE_CHECKING

from merge_distill.recipe import SELF_TEACHER, looks_local

if TYPE_CHECKING:
    from merge_distill.recipe import Recipe


def cross_checks(recipe: "Recipe", check_files: bool = True) -> list[str]:
    problems = _names(recipe)
    problems += recipe.routing.check(recipe.teacher_names, recipe.train_domains)
    problems += recipe.distributed.check()
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
    from merge_distill.cache import recipe_problems  # cache.use: router needs, manifest (cheap fields)

    problems += recipe_problems(recipe, check_files and not problems)
    return problems


def _names(recipe: "Recipe") -> list[str]:
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


def _model_paths(recipe: "Recipe") -> list[str]:
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


def source_files(path: str) -> list[str]:
    """Files named by a data source path: a file, a directory (all files inside) or a glob."""
    p = Path(path)
    if p.is_dir():
        return sorted(str(f) for f in p.rglob("*") if f.is_file() and not f.name.startswith("."))
    return sorted(glob.glob(path)) if any(c in path for c in "*?[") else ([path] if p.is_file() else [])


def _data_paths(recipe: "Recipe") -> list[str]:
    problems: list[str] = []
    for section in ("train", "eval"):
        for i, source in enumerate(getattr(recipe.data, section)):
            if source.type != "hub" and not source_files(source.path):
                problems.append(
                    f"data.{section}[{i}].path: {source.path} matches no file; check the path "
                    "(relative paths start from the recipe's folder)"
                )
    return problems


def model_dirs(recipe: "Recipe") -> list[tuple[str, str]]:
    """(label, local dir) of every model whose tokenizer the run uses."""
    dirs = [(f"teacher {t.name!r}", t.model) for t in recipe.teachers if _is_local(t.model)]
    if recipe.student.model and _is_local(recipe.student.model):
        dirs.append(("student", recipe.student.model))
    return dirs


def _context_lengths(recipe: "Recipe") -> list[str]:
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


# Any one of these makes a folder hold a tokenizer transformers can load.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "spiece.model", "vocab.txt")


def tokenizer_problems(recipe: "Recipe") -> list[str]:
    """All local models must share one tokenizer; say which tokens differ."""
    from merge_distill.models import compare_vocabs, load_tokenizer

    loaded = []
    for label, path in model_dirs(recipe):
        if not any((Path(path) / name).is_file() for name in TOKENIZER_FILES):
            return [f"{label}: {path} holds no tokenizer (none of {', '.join(TOKENIZER_FILES)}); save the model's "
                    "tokenizer next to it (tokenizer.save_pretrained(folder))"]
        try:
            loaded.append((label, load_tokenizer(path)))
        except Exception as exc:  # a broken tokenizer is the user's file: report it, don't crash
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            return [f"{label}: cannot load the tokenizer in {path}: {first}; the tokenizer files are damaged: "
                    "save the model's tokenizer there again"]
    if not loaded:
        return []
    ref_label, ref = loaded[0]
    problems = []
    for label, tok in loaded[1:]:
        diff = compare_vocabs(ref, tok)
        if diff:
            problems.append(
                f"teachers/student: {label} uses a different tokenizer than {ref_label}: {diff}; "
                "all teachers and the student must share one tokenizer"
            )
    return problems
