"""Turning pydantic's errors and command-line overrides into the user's words.

Every message starts with the recipe key path (`teachers[1].model`, `routing.tau`), then says
what was given, what is allowed and how to fix it.
"""

from __future__ import annotations

import difflib
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from merge_distill.losses.registry import DIVERGENCES
from merge_distill.routing.registry import ROUTERS

_UNION_TAGS_MARK = "kind"


def parse_override(item: str) -> tuple[str, Any]:
    """`train.steps=10` -> ("train.steps", 10); the value is parsed as YAML (safe)."""
    if "=" not in item:
        raise ValueError(f"override {item!r} is not KEY=VALUE; write it like train.steps=10")
    key, _, text = item.partition("=")
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ValueError(f"override {item!r} has an empty key part; write it like loss.temperature=2")
    try:
        value = yaml.safe_load(text) if text.strip() else ""
    except yaml.YAMLError:
        value = text
    return key, value


def set_dotted(raw: dict[str, Any], key: str, value: Any) -> None:
    """Set raw[a][b][0][c] = value for key "a.b.0.c", creating mappings as needed."""
    parts = key.split(".")
    node: Any = raw
    for depth, part in enumerate(parts[:-1]):
        where = ".".join(parts[: depth + 1])
        if isinstance(node, list):
            index = _list_index(node, part, where, key)
            node = node[index]
        elif isinstance(node, dict):
            if node.get(part) is not None and not isinstance(node[part], (dict, list)):
                raise ValueError(f"override {key}: {where} is a plain value ({node[part]!r}), not a section; "
                                 f"set it with {where}=VALUE")
            if not isinstance(node.get(part), (dict, list)):
                node[part] = {}
            node = node[part]
        else:
            raise ValueError(f"override {key}: {where} is a plain value, not a section")
    last = parts[-1]
    if isinstance(node, list):
        node[_list_index(node, last, key, key)] = value
    else:
        node[last] = value


def _list_index(node: list, part: str, where: str, key: str) -> int:
    if not part.isdigit() or int(part) >= len(node):
        raise ValueError(f"override {key}: {where} needs a list index from 0 to {len(node) - 1}, got {part!r}")
    return int(part)


def format_loc(loc: tuple[Any, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + str(part)
    return out or "(recipe)"


def _value_at(raw: Any, loc: tuple[Any, ...]) -> Any:
    node = raw
    for part in loc:
        try:
            node = node[part]
        except (KeyError, IndexError, TypeError):
            return None
    return node


def _strip_union_tags(loc: tuple[Any, ...], raw: dict[str, Any]) -> tuple[Any, ...]:
    """pydantic puts the discriminator value in the path (routing.fixed.weights); drop it."""
    out: list[Any] = []
    node: Any = raw
    for part in loc:
        if isinstance(node, dict) and part not in node and node.get(_UNION_TAGS_MARK) == part:
            continue
        out.append(part)
        node = node[part] if isinstance(node, (dict, list)) and _has(node, part) else None
    return tuple(out)


def _has(node: Any, part: Any) -> bool:
    if isinstance(node, dict):
        return part in node
    return isinstance(part, int) and 0 <= part < len(node)


def _model_at(root: type[BaseModel], loc: tuple[Any, ...], raw: Any) -> type[BaseModel] | None:
    """The pydantic model class that holds the key at `loc` (its parent), or None."""
    unions = {"routing": ROUTERS, "loss": DIVERGENCES}
    model: type[BaseModel] | None = root
    node = raw
    for part in loc[:-1]:
        if isinstance(part, int):
            node = _value_at(node, (part,))
            continue
        if model is None or part not in model.model_fields:
            return None
        node = _value_at(node, (part,))
        if model is root and part in unions:
            kind = node.get("kind") if isinstance(node, dict) else None
            if kind not in unions[part].names():
                return None
            model = unions[part].get(kind).config_cls
            continue
        model = _inner_model(model.model_fields[part].annotation)
    return model


def _inner_model(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in getattr(annotation, "__args__", ()) or ():
        found = _inner_model(arg)
        if found is not None:
            return found
    return None


def format_validation_error(exc: ValidationError, raw: dict[str, Any], root: type[BaseModel]) -> list[str]:
    problems: list[str] = []
    seen: set[str] = set()
    for err in exc.errors():
        loc = _strip_union_tags(tuple(err["loc"]), raw)
        key = format_loc(loc)
        given = _value_at(raw, loc)
        kind = err["type"]
        if kind == "extra_forbidden":
            parent = _model_at(root, loc, raw)
            allowed = sorted(parent.model_fields) if parent else []
            close = difflib.get_close_matches(str(loc[-1]), allowed, n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            msg = f"{key}: unknown key; {hint}allowed keys here: {', '.join(allowed)}" if allowed else f"{key}: unknown key; remove it"
        elif kind == "missing":
            msg = f"{key}: required but missing; add it to the recipe"
        elif kind == "union_tag_invalid" or kind == "union_tag_not_found":
            registry = ROUTERS if loc and loc[0] == "routing" else DIVERGENCES
            kind_given = _value_at(raw, (*loc, "kind"))
            msg = (
                f"{key}.kind: {kind_given!r} is not a known {registry.what}; allowed: {', '.join(registry.names())} "
                f"(see `merge-distill ls`)"
            )
        elif kind == "value_error":
            msg = f"{key}: {err['msg'].removeprefix('Value error, ')}"
        else:
            shown = "" if given is None else f" (given: {given!r})"
            msg = f"{key}: {err['msg']}{shown}"
        if msg not in seen:
            seen.add(msg)
            problems.append(msg)
    return problems
