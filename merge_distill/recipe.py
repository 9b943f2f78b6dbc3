"""The recipe: a YAML file validated by pydantic, with dotted overrides and clear errors.

`load_recipe(path, overrides)` returns a `Recipe` whose relative paths are resolved against the
recipe's folder, or raises `UserError` listing every problem at once (key path, value given,
what is allowed, how to fix it).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from merge_distill.errors import UserError
from merge_distill.recipe_checks import cross_checks
from merge_distill.recipe_errors import format_validation_error, parse_override, set_dotted
from merge_distill.schema import SELF_TEACHER, Recipe, looks_local

__all__ = ["Recipe", "load_recipe", "read_yaml", "resolve_paths"]


# -- loading ------------------------------------------------------------------------------


def read_yaml(path: Path) -> dict[str, Any]:
    """Safe YAML only (no Python objects): a recipe can never execute code."""
    if not path.is_file():
        raise UserError(f"{path}: recipe file not found; check the path")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.constructor.ConstructorError as exc:  # e.g. !!python/object: refused, never executed
        mark = exc.problem_mark
        where = f" at line {mark.line + 1}" if mark else ""
        raise UserError(f"{path}: the YAML tag{where} is not allowed ({exc.problem}); a recipe holds plain "
                        "values only and can never run code: remove the tag") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise UserError(f"{path}: not valid YAML{where}: {problem}; fix the syntax there") from None
    except UnicodeDecodeError:
        raise UserError(f"{path}: not a UTF-8 text file; a recipe is a YAML text file") from None
    if raw is None:
        raise UserError(f"{path}: the file is empty; a recipe is a YAML mapping of sections "
                        "(teachers, student, data, train, output)")
    if not isinstance(raw, dict):
        raise UserError(f"{path}: a recipe must be a YAML mapping of sections (teachers, student, data, ...), got {type(raw).__name__}")
    return raw


def load_recipe(path: str | Path, overrides: list[str] = (), check_files: bool = True) -> Recipe:
    """Read, override, validate and resolve a recipe; raises UserError listing every problem."""
    path = Path(path)
    raw = read_yaml(path)
    problems: list[str] = []
    for item in overrides:
        try:
            key, value = parse_override(item)
            set_dotted(raw, key, value)
        except ValueError as exc:
            problems.append(str(exc))
    if problems:
        raise UserError(problems)
    raw.setdefault("name", path.stem)
    try:
        recipe = Recipe.model_validate(raw)
    except ValidationError as exc:
        raise UserError(format_validation_error(exc, raw, Recipe)) from None
    resolve_paths(recipe, path.resolve().parent)
    problems = cross_checks(recipe, check_files=check_files)
    if problems:
        raise UserError(problems)
    return recipe


def resolve_local(value: str, base: Path) -> str:
    """A model reference: resolved to an absolute path when it is local, else kept as a hub id."""
    if value == SELF_TEACHER:
        return value
    candidate = (base / Path(value).expanduser()).resolve()
    if looks_local(value) or candidate.exists():
        return str(candidate)
    return value


def resolve_paths(recipe: Recipe, base: Path) -> None:
    for teacher in recipe.teachers:
        teacher.model = resolve_local(teacher.model, base)
    if recipe.student.model:
        recipe.student.model = resolve_local(recipe.student.model, base)
    if recipe.student.from_config and recipe.student.from_config.base not in recipe.teacher_names:
        recipe.student.from_config.base = resolve_local(recipe.student.from_config.base, base)
    for source in [*recipe.data.train, *recipe.data.eval]:
        if source.type != "hub":
            source.path = str((base / Path(source.path).expanduser()).resolve())
    recipe.output.dir = str((base / Path(recipe.output.dir).expanduser()).resolve())
    if recipe.cache is not None:
        recipe.cache.dir = str((base / Path(recipe.cache.dir).expanduser()).resolve())
    if recipe.data.tokenized_dir is not None:
        recipe.data.tokenized_dir = str((base / Path(recipe.data.tokenized_dir).expanduser()).resolve())
    for key in ("deepspeed_config", "teacher_deepspeed_config"):
        value = getattr(recipe.distributed, key)
        if value is not None:
            setattr(recipe.distributed, key, (base / value).resolve())
