"""The report.json schema (schema_version 1): what a run directory says about one run.

The report is built from the files a run leaves (run.json, metrics.jsonl, stats.json,
eval.json) by `report.build`, and drawn in the terminal by `report.render`. It holds only
small numbers: the per-step curves are one value per optimizer step, the routing statistics
one value per (domain, teacher) pair.

Floats may be NaN or infinite (a diverged run logs `loss: NaN`); they are written to JSON as
the constants NaN / Infinity, which `json.loads` and pydantic both read back. `None` in a
curve means "not logged at that step" (e.g. a teacher that had no share entry).
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

SCHEMA_VERSION = 1

RunStatus = Literal["running", "complete", "failed", "interrupted"]


class _Model(BaseModel):
    # NaN / inf survive a JSON round trip as constants instead of turning into null.
    model_config = ConfigDict(extra="forbid", ser_json_inf_nan="constants")


class RunFacts(_Model):
    """The content of run.json: what was run, how far it got, what it cost."""

    name: str = Field(description="Recipe name (the run's name).")
    recipe_hash: str = Field(description="sha256 hex digest of the resolved recipe (recipe.yaml).")
    recipe_path: str | None = Field(None, description="Path of the recipe file the run was started from.")
    run_dir: str | None = Field(None, description="The run directory as the engine saw it.")
    student_dir: str | None = Field(None, description="Where the trained student was saved.")
    teachers: list[str] = Field(description="Teacher names, in recipe order (the K axis of every [.., K] tensor).")
    router: str | None = Field(None, description="Routing kind (the router registry name).")
    blend: Literal["mixture", "geometric"] | None = Field(
        None, description="mixture: p = sum_k w_k p_k; geometric: p ∝ exp(sum_k w_k log p_k)."
    )
    loss: str | None = Field(None, description="Divergence kind (the loss registry name).")
    steps_planned: int = Field(ge=0, description="Optimizer steps the recipe asks for.")
    steps_done: int = Field(0, ge=0, description="Optimizer steps finished when run.json was last written.")
    tokens_seen: int = Field(0, ge=0, description="Target tokens trained on, summed over all processes.")
    started_at: str | None = Field(None, description="Start time, ISO 8601.")
    finished_at: str | None = Field(None, description="End time, ISO 8601; null while running or after a crash.")
    wall_time_s: float = Field(0.0, ge=0.0, description="Wall-clock seconds from start to the last write.")
    world_size: int = Field(1, ge=1, description="Number of processes (GPUs) the run used.")
    peak_memory_bytes: int | None = Field(
        None, ge=0, description="Peak accelerator memory of one process in bytes; null on CPU or when unknown."
    )
    status: RunStatus = Field("running", description="running, complete, failed or interrupted.")
    skipped_steps: int = Field(0, ge=0, description="Steps skipped (non-finite loss or gradient overflow).")
    trained: str | None = Field(
        None, description="What the optimizer updates: every student weight, or LoRA adapters (rank, alpha, "
                          "modules) and their share of the student's parameters.")


class TeacherStats(_Model):
    """One teacher's routing and quality figures over a set of tokens."""

    share: float = Field(description="Mean routing weight the teacher got, in [0, 1]; shares sum to 1 over teachers.")
    top_share: float = Field(description="Fraction of tokens on which this teacher had the largest weight.")
    mean_nll: float = Field(description="Mean gold negative log-likelihood -log p_k(target), in nats.")
    mean_entropy: float = Field(description="Mean entropy of the teacher's next-token distribution, in nats.")
    aligned: float = Field(1.0, description="Fraction of the student's target positions this teacher covers: 1 for "
                           "teachers that share the student's tokenizer; for others, positions aligned with theirs.")
    bytes_per_token: float | None = Field(None, description="Mean bytes of the teacher's next token where it covers "
                                          "a position (teachers run through the cross-tokenizer path); null if unknown.")


class DomainStats(_Model):
    """Routing figures restricted to the tokens of one data domain."""

    tokens: int = Field(ge=0, description="Target tokens of this domain that were counted.")
    teachers: dict[str, TeacherStats] = Field(description="Per teacher name: figures over this domain's tokens.")


class Agreement(_Model):
    """How alike two teachers' predictions are."""

    a: str = Field(description="First teacher name.")
    b: str = Field(description="Second teacher name.")
    top1_agreement: float = Field(description="Fraction of tokens on which both teachers have the same argmax token.")
    js: float = Field(description="Mean Jensen-Shannon divergence between the two distributions, in nats.")


class Routing(_Model):
    """The content of stats.json: accumulated routing statistics over the whole run."""

    teachers: list[str] = Field(description="Teacher names, in recipe order.")
    tokens: int = Field(ge=0, description="Target tokens the statistics cover.")
    overall: dict[str, TeacherStats] = Field(description="Per teacher name: figures over all tokens.")
    per_domain: dict[str, DomainStats] = Field(description="Per data domain: token count and per-teacher figures.")
    agreement: list[Agreement] = Field(description="One entry per unordered teacher pair.")
    blend_entropy: float = Field(description="Mean entropy of the blended target distribution, in nats.")


class Curves(_Model):
    """Per-step series from metrics.jsonl; every list has one entry per logged step."""

    step: list[int] = Field(default_factory=list, description="Optimizer step numbers, ascending.")
    loss: list[float | None] = Field(default_factory=list, description="Total training loss per step.")
    divergence: list[float | None] = Field(default_factory=list, description="Distillation divergence part of the loss.")
    ce: list[float | None] = Field(default_factory=list, description="Cross-entropy on gold labels per step.")
    lr: list[float | None] = Field(default_factory=list, description="Learning rate per step.")
    tokens_per_s: list[float | None] = Field(default_factory=list, description="Training throughput per step, all processes.")
    share: dict[str, list[float | None]] = Field(
        default_factory=dict, description="Per teacher name: that step's mean routing weight (None if not logged)."
    )
    reverse_kl: dict[str, list[float | None]] = Field(
        default_factory=dict, description="On-policy runs, per teacher name: that step's reverse KL(student || teacher) "
        "per sampled token it covers, nats (None at a step without on-policy micro-batches).")


class EvalRow(_Model):
    """Evaluation of one model (the student or one teacher) on each domain."""

    model: str = Field(description="Label of the evaluated model (e.g. 'student' or a teacher name).")
    kind: Literal["student", "teacher"] = Field(description="Whether the row is the student or a teacher.")
    ppl: dict[str, float] = Field(description="Per domain: perplexity exp(mean NLL); lower is better. Only for "
                                  "models that share the student's tokenizer.")
    nll: dict[str, float] = Field(description="Per domain: mean gold NLL in nats.")
    tokens: dict[str, int] = Field(description="Per domain: number of evaluated target tokens.")
    bpb: dict[str, float] = Field(default_factory=dict, description="Per domain: bits per byte of the same text, "
                                  "each model on its own tokens (compares tokenizers); lower is better.")


class Evaluation(_Model):
    """The content of eval.json: held-out per-domain perplexity of student and teachers."""

    domains: list[str] = Field(description="Evaluated domains, in display order.")
    rows: list[EvalRow] = Field(description="One row per evaluated model.")


class SampleRow(_Model):
    """One answer from samples.jsonl (`merge-distill sample`)."""

    prompt: str = Field(description="The last user turn of the prompt.")
    model: str = Field(description="`student` or a teacher name.")
    answer: str = Field(description="The model's answer.")
    nll: dict[str, float | None] = Field(description="Mean NLL per token (nats) of the answer under each teacher.")


class Completion(_Model):
    """One fixed prompt and the student's greedy completion (onpolicy_samples.json)."""

    prompt: str = Field(description="The prompt as text.")
    completion: str = Field(description="The student's greedy completion as text.")


class OnPolicySamples(_Model):
    """onpolicy_samples.json: the fixed prompts' greedy completions at the start and the end."""

    start: list[Completion] = Field(default_factory=list, description="Greedy completions before the first step.")
    end: list[Completion] = Field(default_factory=list, description="Greedy completions of the same prompts at the end.")


class OnPolicy(_Model):
    """On-policy steps over the whole run (from metrics.jsonl and onpolicy_samples.json)."""

    tokens: int = Field(ge=0, description="Sampled target tokens trained on, all processes.")
    target_tokens: int = Field(ge=0, description="All target tokens trained on (data and sampled).")
    share: dict[str, float | None] = Field(description="Per teacher: mean routing weight over the sampled tokens.")
    start: list[Completion] = Field(default_factory=list, description="Greedy completions before the first step.")
    end: list[Completion] = Field(default_factory=list, description="Greedy completions of the same prompts at the end.")


class Report(_Model):
    """report.json: everything the terminal report shows, built from one run directory."""

    schema_version: Literal[1] = Field(SCHEMA_VERSION, description="Version of this schema; bumped on breaking changes.")
    source_dir: str = Field(description="The run directory the report was built from.")
    run: RunFacts | None = Field(None, description="run.json; null if that file was missing.")
    routing: Routing | None = Field(None, description="stats.json; null if that file was missing.")
    curves: Curves = Field(default_factory=Curves, description="Per-step series from metrics.jsonl (empty if missing).")
    eval: Evaluation | None = Field(None, description="eval.json; null when no evaluation ran.")
    samples: list[SampleRow] = Field(
        default_factory=list, description="The answers to the first prompts of samples.jsonl (`merge-distill sample`); "
                                          "empty when that file does not exist.")
    on_policy: OnPolicy | None = Field(None, description="Runs with onpolicy.lmbda > 0; null otherwise.")
    complete: bool = Field(description="True only if status is 'complete' and no expected file is missing.")
    missing: list[str] = Field(
        default_factory=list, description="Expected files that were absent (e.g. 'stats.json', 'student/')."
    )
    warnings: list[str] = Field(
        default_factory=list, description="Things tolerated while building (a truncated last metrics line, unknown keys)."
    )

    @property
    def teacher_names(self) -> list[str]:
        """Teachers in recipe order, from whichever source is present."""
        if self.run is not None:
            return list(self.run.teachers)
        if self.routing is not None:
            return list(self.routing.teachers)
        return list(self.curves.share)

    @property
    def status(self) -> str:
        return self.run.status if self.run is not None else "unknown"
