"""The teacher-source interface and its registry.

A teacher source answers one question for every phase (training, `merge-distill cache`,
evaluation): what do the teachers say about this batch?

    source.signals(batch) -> DenseSignals | SparseSignals

Each implementation is one file that registers itself with `@register_source(...)`, plus one
import line in `sources/__init__.py`. The class has `signals`, `held_bytes` and `for_training(recipe, SourceContext)`. The
registration names what the source provides to
routers (a subset of SIGNALS) and when a recipe selects it, so `validate` can check a router's
`needs` against the source before anything is loaded.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from merge_distill.schema import Recipe
from merge_distill.signals import TokenBatch
from merge_distill.sources.signals import DenseSignals, SparseSignals

# What a router may ask for: per-token gold NLL, entropy, argmax of each teacher; "logits", the
# full distributions; "hidden", the student's last hidden state (every source offers it, since
# the student runs in every training step).
SIGNALS = frozenset({"gold_nll", "entropy", "top1", "logits", "hidden"})


class TeacherSource(Protocol):
    """K teachers behind one call. `names` are the recipe's teacher names, in order."""

    names: list[str]

    def signals(self, batch: TokenBatch) -> DenseSignals | SparseSignals:
        """batch [B, T] on the source's device -> what the teachers say about every position."""
        ...

    def held_bytes(self) -> list[tuple[int, int]]:
        """Per teacher: (parameter bytes this process holds, bytes of the whole teacher)."""
        ...

    @classmethod
    def for_training(cls, recipe: Recipe, context: SourceContext) -> "TeacherSource":
        """The source as the training phase opens it."""
        ...


@dataclass
class SourceContext:
    """What a training source may need to open: the placement, the student's tokenizer and
    initial weights (for a `self` teacher), the tokenized training rows (for the cache's manifest)."""

    accelerator: Any
    tokenizer: Any
    rows: list[Any]
    student: Any


@dataclass(frozen=True)
class SourceEntry:
    name: str
    provides: frozenset[str]
    selects: Callable[[Recipe], bool]  # whether a recipe's training phase uses this source
    summary: str
    build: Any  # the class; its `for_training(recipe, context)` classmethod opens the source


SOURCES: dict[str, SourceEntry] = {}


def register_source(name: str, provides: set[str], selects: Callable[[Recipe], bool], summary: str):
    """Class decorator: register a teacher source under `name`."""
    unknown = set(provides) - SIGNALS
    if unknown:
        raise ValueError(f"source {name!r} provides unknown signals {sorted(unknown)}; known: {sorted(SIGNALS)}")

    def decorator(cls: type) -> type:
        if name in SOURCES:
            raise ValueError(f"teacher source {name!r} is registered twice")
        SOURCES[name] = SourceEntry(name, frozenset(provides), selects, summary, cls)
        return cls

    return decorator


def training_source(recipe: Recipe) -> SourceEntry:
    """The source a recipe's training phase uses (the first registered one that selects it)."""
    chosen = [entry for entry in SOURCES.values() if entry.selects(recipe)]
    if len(chosen) != 1:
        raise ValueError(f"{len(chosen)} teacher sources select this recipe ({[e.name for e in chosen]}); exactly one must")
    return chosen[0]


def needs_problems(recipe: Recipe, router_kind: str, needs: frozenset[str]) -> list[str]:
    """What the recipe's router needs that its training source does not provide, as recipe errors."""
    entry = training_source(recipe)
    missing = sorted(needs - entry.provides)
    if not missing:
        return []
    return [f"routing.kind: {router_kind!r} needs {', '.join(missing)}, which the {entry.name} teacher source does not "
            f"provide (it gives {', '.join(sorted(entry.provides))}); choose another router or another source "
            f"(e.g. cache.use: false runs the teachers)"]
