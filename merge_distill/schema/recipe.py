"""The recipe's schema: every section as a pydantic model (the bottom of the import graph).

Nothing here imports the runtime (data, models, teachers, engine); the routers' and losses'
config classes come from their registries, which import only torch and pydantic.
"""

from __future__ import annotations

import hashlib
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, model_validator

from merge_distill.losses.registry import DIVERGENCES
from merge_distill.routing.registry import ROUTERS
from merge_distill.schema.cache import CacheSection
from merge_distill.schema.distributed import DistributedConfig
from merge_distill.schema.onpolicy import OnPolicySection

SELF_TEACHER = "self"
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]*$"


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TeacherSpec(Section):
    name: str = Field(description="Unique short name used in routing weights and reports.", pattern=NAME_PATTERN)
    model: str = Field(
        description="A local model directory (relative to the recipe), a hub id, or `self` for a frozen "
        "copy of the student's initial weights."
    )
    revision: str | None = Field(None, description="Hub revision (branch, tag or commit) for a hub model.")
    dtype: Literal["float32", "bfloat16", "float16"] | None = Field(
        None, description="Weights dtype of the teacher; default follows train.precision."
    )
    trust_remote_code: bool = Field(False, description="Allow the model's own Python code from the hub (a warning names it).")


class StudentFromTeacher(Section):
    teacher: str = Field(description="Name of the teacher whose weights seed the student.")
    layers: list[int] = Field(min_length=1, description="Indices of the teacher's decoder layers to keep, in order.")


class StudentFromConfig(Section):
    base: str = Field(description="A teacher name, or a model directory / hub id, whose config is the base.")
    overrides: dict[str, Any] = Field(
        default_factory=dict, description="Config fields to change, e.g. {num_hidden_layers: 2, hidden_size: 64}."
    )


class LoraSection(Section):
    r: int = Field(16, ge=1, description="Rank of the adapter matrices.")
    alpha: float = Field(32.0, gt=0, description="Scale: the adapter's update is multiplied by alpha / r.")
    dropout: float = Field(0.0, ge=0, lt=1, description="Dropout on the adapter's input.")
    target_modules: list[str] = Field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"], min_length=1,
        description="Names of the linear layers that get an adapter (the last part of the module name).")


class StudentSpec(Section):
    model: str | None = Field(None, description="A local model directory or hub id to start from.")
    revision: str | None = Field(None, description="Hub revision for `model`.")
    from_teacher: StudentFromTeacher | None = Field(None, description="Initialise from a subset of a teacher's layers.")
    from_config: StudentFromConfig | None = Field(None, description="Random init from a (modified) config.")
    trust_remote_code: bool = Field(False, description="Allow the student model's own code from the hub.")
    lora: LoraSection | None = Field(
        None, description="Train a LoRA adapter (peft) instead of every weight; the base stays frozen.")

    @model_validator(mode="after")
    def _exactly_one_init(self) -> "StudentSpec":
        given = [k for k in ("model", "from_teacher", "from_config") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(
                f"give exactly one of model, from_teacher, from_config (given: {', '.join(given) or 'none'})"
            )
        return self


class DataSource(Section):
    name: str | None = Field(None, description="Name shown in reports and errors; default: the domain.")
    type: Literal["text", "jsonl", "parquet", "hub"] = Field(description="How to read `path`.")
    path: str = Field(description="File, directory or glob (relative to the recipe), or a hub dataset name.")
    subset: str | None = Field(None, description="Hub dataset configuration name.")
    split: str = Field("train", description="Hub dataset split.")
    revision: str | None = Field(None, description="Hub dataset revision.")
    field: str = Field("text", description="Column holding plain text, or a `messages` list for chat data.")
    format: Literal["auto", "text", "chat"] = Field(
        "auto", description="text: every token is a target; chat: chat template, assistant tokens only; auto: chat if the field holds lists."
    )
    domain: str = Field(description="Domain tag carried to every batch row (routing and reports).", pattern=NAME_PATTERN)
    weight: float = Field(1.0, gt=0, description="Mixing weight: share of training rows drawn from this source.")
    max_examples: int | None = Field(None, ge=1, description="Use at most this many examples.")
    streaming: bool = Field(False, description="Stream the examples (datasets streaming), tokenizing on the fly; nothing "
                            "is stored. For corpora beyond the disk budget. Order: a 10,000-example shuffle buffer "
                            "seeded by train.seed, pass after pass (docs/DATA.md). Needs train.steps; not with cache.")

    @property
    def label(self) -> str:
        return self.name or self.domain


class DataSection(Section):
    seq_len: int = Field(512, ge=8, description="Tokens per training row.")
    packing: bool = Field(True, description="Concatenate examples and cut into rows of seq_len (no padding).")
    train: list[DataSource] = Field(min_length=1, description="Training sources, mixed by weight.")
    eval: list[DataSource] = Field(default_factory=list, description="Held-out sources for evaluation.")
    eval_tokens: int = Field(32768, ge=1, description="At most this many held-out target tokens per domain are evaluated.")
    tokenized_dir: str | None = Field(
        None, description="Where tokenized rows are kept (memory-mapped Arrow, one folder per fingerprint of data, "
        "tokenizer, seq_len and packing; relative to the recipe). Default: $MERGE_DISTILL_CACHE/tokenized, "
        "else ~/.cache/merge_distill/tokenized.")
    num_proc: int | None = Field(None, ge=1, description="Processes that tokenize a source; default: up to 8 by size.")


class TrainSection(Section):
    steps: int | None = Field(None, ge=1, description="Optimizer steps. Give steps or epochs.")
    epochs: float | None = Field(None, gt=0, description="Passes over the training rows (converted to steps).")
    micro_batch_size: int = Field(4, ge=1, description="Rows per process per forward.")
    grad_accum: int = Field(1, ge=1, description="Micro-batches per optimizer step.")
    lr: float = Field(1e-4, gt=0, description="Peak learning rate of AdamW.")
    warmup_steps: int = Field(0, ge=0, description="Linear warm-up steps.")
    schedule: Literal["constant", "linear", "cosine"] = Field("cosine", description="Decay after warm-up.")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay.")
    max_grad_norm: float | None = Field(1.0, gt=0, description="Gradient clipping norm; null disables.")
    precision: Literal["fp32", "bf16", "fp16"] = Field("fp32", description="Compute precision of student and teachers.")
    seed: int = Field(0, description="Seed for init, data order and everything random.")
    chunk_tokens: int = Field(1024, ge=1, description="Tokens per chunk in blend and loss (memory vs speed).")
    on_nonfinite: Literal["stop", "skip"] = Field(
        "stop", description="NaN/inf in teacher outputs, loss or gradients: stop with an error, or skip the step (counted)."
    )
    log_every: int = Field(5, ge=1, description="Refresh the live display every this many steps.")
    fused_loss: bool = Field(
        False, description="Logit-free loss: the student's [B, T, V] logits are never built; the loss takes its final "
        "hidden states and lm_head and makes logits one chunk at a time (losses/fused.py). Any teacher source (live, "
        "cache, other tokenizers). Needs a plain linear head, student_zero_stage < 3, onpolicy.lmbda 0.")

    @model_validator(mode="after")
    def _steps_or_epochs(self) -> "TrainSection":
        if self.steps is None and self.epochs is None:
            raise ValueError("give train.steps or train.epochs")
        if self.steps is not None and self.epochs is not None:
            raise ValueError("give train.steps or train.epochs, not both")
        return self


class OutputSection(Section):
    dir: str = Field(description="Run directory (relative to the recipe). Never overwritten silently.")
    save_every: int = Field(0, ge=0, description="Checkpoint every this many steps; 0 saves only at the end.")
    keep_last: int = Field(2, ge=1, description="Checkpoints to keep.")
    merge_lora: bool = Field(
        False, description="With student.lora: save student/ as the base with the adapter merged in (a plain model), "
                           "and the adapter in student/adapter/. Needed when the base is not a saved model.")
    report_to: list[Literal["tensorboard", "wandb", "mlflow", "trackio", "comet_ml", "aim", "clearml", "dvclive",
                            "swanlab"]] = Field(
        default_factory=list,
        description="Experiment trackers (accelerate's) that receive the step metrics, the evaluation and the "
                    "resolved recipe; files under RUN_DIR/trackers/. Each needs its pip package.")


class ReportSection(Section):
    eval_at_end: bool = Field(True, description="After training, evaluate student and teachers on data.eval (if any).")
    eval_teachers: bool = Field(True, description="Include every teacher in the end-of-run evaluation.")


class AlignSection(Section):
    k: int = Field(64, ge=1, description="Teachers with another tokenizer: top-k log-probs per aligned position, "
                   "projected into the student's vocabulary (the rest is a tail bucket; docs/CROSS_TOKENIZER.md).")
    force: bool = Field(False, description="Send teachers that share the student's tokenizer through the "
                        "cross-tokenizer path too (a check: at k = vocabulary size it gives the same loss).")


class Recipe(Section):
    name: str | None = Field(None, description="Recipe name; default: the file name.")
    teachers: list[TeacherSpec] = Field(min_length=1, description="Teacher models.")
    student: StudentSpec = Field(description="The model being trained.")
    data: DataSection = Field(description="Training and evaluation data.")
    routing: ROUTERS.config_union() = Field(  # type: ignore[valid-type]
        default_factory=lambda: ROUTERS.get("uniform").config_cls(kind="uniform"),
        description="How teachers are weighted per token; `kind` picks the router.",
    )
    loss: DIVERGENCES.config_union() = Field(  # type: ignore[valid-type]
        default_factory=lambda: DIVERGENCES.get("forward_kl").config_cls(kind="forward_kl"),
        description="Divergence between student and blended target; `kind` picks it.",
    )
    train: TrainSection = Field(description="Optimisation settings.")
    output: OutputSection = Field(description="Where the run is written.")
    distributed: DistributedConfig = Field(default_factory=DistributedConfig, description="Multi-process settings.")
    report: ReportSection = Field(default_factory=ReportSection, description="What the end-of-run report includes.")
    align: AlignSection = Field(default_factory=AlignSection, description="Teachers whose tokenizer differs from the "
                                "student's: aligned through byte offsets (docs/CROSS_TOKENIZER.md).")
    cache: CacheSection | None = Field(
        None, description="Offline teacher cache: `merge-distill cache` writes it; `use: true` trains from it "
        "without loading the teachers (docs/CACHE.md).")
    onpolicy: OnPolicySection = Field(
        default_factory=OnPolicySection, description="On-policy distillation: the student samples completions of "
        "prompts from the training rows, and the teachers grade every sampled token (docs/ONPOLICY.md).")

    # -- derived ---------------------------------------------------------------------------
    @property
    def teacher_names(self) -> list[str]:
        return [t.name for t in self.teachers]

    @property
    def train_domains(self) -> list[str]:
        return sorted({s.domain for s in self.data.train})

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False, allow_unicode=True)

    def content_hash(self) -> str:
        return hashlib.sha256(self.to_yaml().encode()).hexdigest()


def looks_local(value: str) -> bool:
    return value.startswith((".", "/", "~")) or "\\" in value
