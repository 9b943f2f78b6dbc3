"""Divergences (one file each, registered by name), blends and the chunked loss driver.

A divergence is `fn(student_logprobs [N, V], target_logprobs [N, V], config) -> [N]`; look it up
with `DIVERGENCES.get(config.kind).impl`. `distill_loss` applies one to the blended teachers.
"""

from merge_distill.losses.base import LossConfigBase
from merge_distill.losses.registry import DIVERGENCES, DivergenceFn

import merge_distill.losses.forward_kl  # noqa: E402,F401  registers "forward_kl"
import merge_distill.losses.reverse_kl  # noqa: E402,F401  registers "reverse_kl"
import merge_distill.losses.jsd  # noqa: E402,F401  registers "jsd"
import merge_distill.losses.skew_kl  # noqa: E402,F401  registers "skew_kl"
import merge_distill.losses.tvd  # noqa: E402,F401  registers "tvd"

from merge_distill.losses.blend import BLEND_MODES, blend_logprobs  # noqa: E402
from merge_distill.losses.chunked import DistillOutput, distill_loss, distill_loss_dense  # noqa: E402

__all__ = [
    "BLEND_MODES",
    "DIVERGENCES",
    "DistillOutput",
    "DivergenceFn",
    "LossConfigBase",
    "blend_logprobs",
    "distill_loss",
    "distill_loss_dense",
]
