"""Registries of pluggable pieces (routers, divergences).

A pluggable piece is one file that defines a pydantic config class (with a `kind` literal) and
an implementation, and registers both with a decorator:

    @DIVERGENCES.register("forward_kl", ForwardKLConfig, "KL(target || student), mode-covering")
    def forward_kl(...): ...

plus one import line in its package's `__init__.py`. The recipe builds its discriminated union
on `kind` from the registry, so a new piece needs no edit anywhere else.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any, Callable, Generic, TypeVar, Union

from pydantic import BaseModel, Field

T = TypeVar("T")


@dataclass(frozen=True)
class Entry(Generic[T]):
    name: str
    config_cls: type[BaseModel]
    impl: T
    summary: str


class Registry(Generic[T]):
    def __init__(self, what: str):
        self.what = what
        self._entries: dict[str, Entry[T]] = {}

    def register(self, name: str, config_cls: type[BaseModel], summary: str) -> Callable[[T], T]:
        def decorator(impl: T) -> T:
            if name in self._entries:
                raise ValueError(f"{self.what} {name!r} is registered twice")
            self._entries[name] = Entry(name, config_cls, impl, summary)
            return impl

        return decorator

    def get(self, name: str) -> Entry[T]:
        if name not in self._entries:
            raise KeyError(f"unknown {self.what} {name!r}; known: {', '.join(self.names())}")
        return self._entries[name]

    def names(self) -> list[str]:
        return sorted(self._entries)

    def entries(self) -> list[Entry[T]]:
        return [self._entries[n] for n in self.names()]

    def config_union(self) -> Any:
        """A pydantic type: the union of all registered configs, discriminated on `kind`."""
        configs = tuple(e.config_cls for e in self.entries())
        if len(configs) == 1:
            return configs[0]
        return Annotated[Union[configs], Field(discriminator="kind")]  # type: ignore[valid-type]
