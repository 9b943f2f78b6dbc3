"""Routers: per-token teacher weights [B, T, K] from cheap teacher signals.

One file per router kind; each registers itself in `ROUTERS` when imported below.

    uniform   w_k = 1/K
    fixed     w_k = c_k / sum c                   (constant, from the recipe)
    entropy   w = softmax(-H / tau)               (confident teachers)
    ce        w = softmax(-NLL / tau), tau=0: argmin (teachers that knew the gold token)
    domain    w = c[domain] / sum c[domain]       (per data domain, from the recipe)
    learned   w = softmax(gate(student hidden))   (gate trained on the mixture likelihood)

Every router then gets the shared top_k / floor / mask treatment of `Router.forward`.
"""

from __future__ import annotations

from merge_distill.errors import UserError
from merge_distill.routing.base import Router, RouterConfigBase, RouterInputs
from merge_distill.routing.ce import CERouter, CERouterConfig
from merge_distill.routing.domain import DomainRouter, DomainRouterConfig
from merge_distill.routing.entropy import EntropyRouter, EntropyRouterConfig
from merge_distill.routing.fixed import FixedRouter, FixedRouterConfig
from merge_distill.routing.learned import LearnedRouter, LearnedRouterConfig
from merge_distill.routing.registry import ROUTERS
from merge_distill.routing.uniform import UniformRouter, UniformRouterConfig

# The pydantic type the recipe uses for its `routing:` section (discriminated on `kind`).
RouterConfig = ROUTERS.config_union()


def build_router(config: RouterConfigBase, teacher_names: list[str], hidden_size: int) -> Router:
    """The router named by `config.kind`, for these teachers and a student of this hidden size.

    Raises UserError listing every teacher-related problem of the config (the data-domain
    coverage check needs the data, so the recipe runs `config.check(teachers, domains)` itself).
    """
    entry = ROUTERS.get(config.kind)  # type: ignore[attr-defined]
    if not isinstance(config, entry.config_cls):
        raise TypeError(f"router {entry.name!r} expects a {entry.config_cls.__name__}, got {type(config).__name__}")
    problems = config.check(list(teacher_names), [])
    if problems:
        raise UserError(problems)
    return entry.impl(config, list(teacher_names), hidden_size)


__all__ = [
    "ROUTERS",
    "RouterConfig",
    "build_router",
    "Router",
    "RouterConfigBase",
    "RouterInputs",
    "UniformRouter",
    "UniformRouterConfig",
    "FixedRouter",
    "FixedRouterConfig",
    "EntropyRouter",
    "EntropyRouterConfig",
    "CERouter",
    "CERouterConfig",
    "DomainRouter",
    "DomainRouterConfig",
    "LearnedRouter",
    "LearnedRouterConfig",
]
