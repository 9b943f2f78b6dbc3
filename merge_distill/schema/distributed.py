"""The recipe's `distributed:` section (schema only; placement itself is merge_distill.distributed)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field


class DistributedConfig(BaseModel):
    """The recipe's `distributed:` section."""

    model_config = ConfigDict(extra="forbid")

    use_deepspeed: Literal["auto", "always", "never"] = Field(
        "auto", description="auto: DeepSpeed when launched with more than one process (WORLD_SIZE > 1); "
        "always: also in a single process (ZeRO-3 then only adds offload); never: plain DDP.")
    teacher_zero_stage: Literal[0, 3] = Field(
        3, description="3: partition each teacher's weights across processes (ZeRO-3 inference); "
        "0: every process holds whole teachers. Only used under DeepSpeed.")
    student_zero_stage: Literal[0, 1, 2, 3] = Field(
        0, description="ZeRO stage of the student: 1 partitions optimizer state, 2 also gradients, "
        "3 also weights. Only used under DeepSpeed.")
    offload_teacher_params: bool = Field(
        False, description="Keep the teachers' ZeRO-3 partitions in CPU memory (needs teacher_zero_stage 3).")
    offload_optimizer: bool = Field(
        False, description="Keep the student's optimizer state in CPU memory (needs student_zero_stage >= 1).")
    zero3_param_persistence_threshold: int = Field(
        100_000, ge=0, description="Under ZeRO-3, tensors with at most this many elements (norms, biases) "
        "stay whole on every process instead of being partitioned.")
    deepspeed_config: Path | None = Field(
        None, description="A DeepSpeed JSON for the student, merged over the one built from these fields "
        "and `train:` (its values win). Must not define `optimizer` or `scheduler`.")
    collective_timeout_s: int = Field(
        1800, ge=10, description="Seconds a collective (all-reduce, barrier) waits for every process before it "
        "fails: a process stuck or lost on another node then stops the others within this time. Raise it when "
        "one process may spend long alone between collectives (e.g. saving a large checkpoint).")
    teacher_deepspeed_config: Path | None = Field(
        None, description="A DeepSpeed JSON merged over the built teacher config (e.g. offload to nvme).")

    def check(self) -> list[str]:
        """Cross-field problems, one line each, key path first."""
        problems: list[str] = []
        if self.offload_optimizer and self.student_zero_stage == 0:
            problems.append("distributed.offload_optimizer needs student_zero_stage >= 1 (ZeRO-Offload moves the "
                            "partitioned optimizer state); set student_zero_stage: 2 or offload_optimizer: false")
        if self.offload_teacher_params and self.teacher_zero_stage != 3:
            problems.append("distributed.offload_teacher_params needs teacher_zero_stage: 3 (only partitioned "
                            "weights can be offloaded); set teacher_zero_stage: 3 or offload_teacher_params: false")
        if self.use_deepspeed == "never":
            used = [k for k in ("offload_teacher_params", "offload_optimizer") if getattr(self, k)]
            used += [k for k in ("deepspeed_config", "teacher_deepspeed_config") if getattr(self, k) is not None]
            used += ["student_zero_stage"] if self.student_zero_stage else []
            if used:
                problems.append(f"distributed.use_deepspeed is never, so {', '.join(used)} would be ignored; "
                                "set use_deepspeed: auto or always, or remove them")
        for key in ("deepspeed_config", "teacher_deepspeed_config"):
            problems += _json_problems(f"distributed.{key}", getattr(self, key))
        user = read_json(self.deepspeed_config) if self.deepspeed_config and self.deepspeed_config.is_file() else {}
        for section in ("optimizer", "scheduler"):
            if section in user:
                problems.append(f"distributed.deepspeed_config defines '{section}'; merge_distill builds it from "
                                "the recipe's train: section; remove it from the JSON")
        stage = user.get("zero_optimization", {}).get("stage") if isinstance(user, dict) else None
        if stage is not None and stage != self.student_zero_stage:
            problems.append(f"distributed.deepspeed_config sets zero_optimization.stage {stage} but "
                            f"student_zero_stage is {self.student_zero_stage}; set the stage in one place")
        return problems


def read_json(path: Path) -> Any:
    return json.loads(Path(path).read_text(encoding="utf-8"))


def _json_problems(key: str, path: Path | None) -> list[str]:
    if path is None:
        return []
    if not Path(path).is_file():
        return [f"{key}: file {path} not found; give the path of a DeepSpeed JSON, relative to the recipe"]
    try:
        data = read_json(path)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        return [f"{key}: {path} is not valid JSON ({exc})"]
    return [] if isinstance(data, dict) else [f"{key}: {path} must hold a JSON object, got {type(data).__name__}"]
