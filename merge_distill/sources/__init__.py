"""Teacher sources: one interface (`signals(batch)`) for every phase, several implementations.

    online   the teacher models run on every batch, whole or ZeRO-3 sharded (sources/online.py)
    aligned  teachers with other tokenizers, aligned through byte offsets (sources/aligned.py)
    cache    top-k + tail targets from the offline cache; no model is loaded (sources/cached.py)

A new source is one file that defines a class with `signals`, `held_bytes` and `for_training` and registers it
with `@register_source(name, provides, selects, summary)`, plus one import line below.
"""

from merge_distill.sources.aligned import AlignedTeachers
from merge_distill.sources.base import (
    SIGNALS,
    SOURCES,
    SourceContext,
    TeacherSource,
    needs_problems,
    register_source,
    training_source,
)
from merge_distill.sources.cached import CachedTeachers
from merge_distill.sources.online import OnlineTeachers
from merge_distill.sources.signals import Agreement, DenseSignals, LossSetup, SparseSignals, TeacherSignals

__all__ = [
    "SIGNALS", "SOURCES", "AlignedTeachers", "Agreement", "CachedTeachers", "SourceContext", "DenseSignals", "LossSetup", "OnlineTeachers", "SparseSignals",
    "TeacherSignals", "TeacherSource", "needs_problems", "register_source", "training_source",
]
