"""The router registry.

It lives in its own module so that each router file (which registers itself) and
`routing/__init__.py` (which imports every router file) can both import it without a cycle.
Entries: name = the recipe's `routing.kind`, config_cls = that router's pydantic config,
impl = the `Router` subclass, summary = one line for `merge-distill ls`.
"""

from __future__ import annotations

from merge_distill.registry import Registry
from merge_distill.routing.base import Router

ROUTERS: Registry[type[Router]] = Registry("router")
