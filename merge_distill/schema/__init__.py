"""The recipe schema: pydantic sections and constants, importing nothing from the runtime."""

from merge_distill.schema.cache import CacheSection
from merge_distill.schema.distributed import DistributedConfig
from merge_distill.schema.onpolicy import OnPolicySection
from merge_distill.schema.recipe import (
    NAME_PATTERN,
    SELF_TEACHER,
    AlignSection,
    DataSection,
    DataSource,
    LoraSection,
    OutputSection,
    Recipe,
    ReportSection,
    StudentFromConfig,
    StudentFromTeacher,
    StudentSpec,
    TeacherSpec,
    TrainSection,
    looks_local,
)

__all__ = [
    "NAME_PATTERN", "SELF_TEACHER", "AlignSection", "CacheSection", "DataSection", "DataSource", "DistributedConfig", "LoraSection", "OnPolicySection", "OutputSection",
    "Recipe", "ReportSection", "StudentFromConfig", "StudentFromTeacher", "StudentSpec", "TeacherSpec", "TrainSection",
    "looks_local",
]
