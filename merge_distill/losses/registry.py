"""The registry of divergences (and one tiny shared helper), in its own module so that the
divergence files and the package's `__init__` can both import it without a cycle."""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from merge_distill.losses.base import LossConfigBase
from merge_distill.registry import Registry

# fn(student_logprobs [N, V], target_logprobs [N, V], config) -> per-token divergence [N]
DivergenceFn = Callable[[Tensor, Tensor, LossConfigBase], Tensor]

DIVERGENCES: Registry[DivergenceFn] = Registry("loss")


def scalar_like(value: float, like: Tensor) -> Tensor:
    """A 0-dim tensor with `like`'s dtype and device (broadcasts without an [N, V] copy)."""
    return torch.tensor(value, dtype=like.dtype, device=like.device)
