"""Teacher sources: one interface (`signals(batch)`) for every phase, several implementations.

    online   the teacher models run on every batch, whole or ZeRO-3 sharded (sources/online.py)
    cache    top-k + tail targets from the offline cache; no model is loaded (sources/cached.py)

A new source is one file that defines a class with `signals` and `held_bytes` and registers it
with `@register_source(name, provides, selects, summary)`, plus one import line below.
"""

from merge_distill.sources.base import SIGNALS, SOURCES, TeacherSource, needs_problems, register_source, training_source
from merge_distill.sources.cached import CachedTeachers
from merge_distill.sources.online import OnlineTeachers
from merge_distill.sources.signals import Agreement, DenseSignals, LossSetup, SparseSignals, TeacherSignals

__all__ = [
    "SIGNALS", "SOURCES", "Agreement", "CachedTeachers", "DenseSignals", "LossSetup", "OnlineTeachers", "SparseSignals",
    "TeacherSignals", "TeacherSource", "needs_problems", "register_source", "training_source",
]
