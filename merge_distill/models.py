"""Loading teachers and the student with transformers; tokenizer and vocabulary checks."""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from functools import lru_cache
from pathlib import Path

import torch
from accelerate import init_empty_weights
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors import SafetensorError, safe_open
from torch import Tensor, nn
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from merge_distill.errors import UserError
from merge_distill.schema import SELF_TEACHER, LoraSection, Recipe, TeacherSpec

# Any one of these makes a folder hold a tokenizer transformers can load.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "spiece.model", "vocab.txt")

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16,
          "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def warn_remote_code(label: str, model: str, trust: bool) -> None:
    if trust:
        warnings.warn(f"{label} ({model}) runs its own Python code from the model repository (trust_remote_code: true)")


def load_tokenizer(path: str, revision: str | None = None, trust_remote_code: bool = False) -> PreTrainedTokenizerBase:
    return AutoTokenizer.from_pretrained(path, revision=revision, trust_remote_code=trust_remote_code)


def compare_vocabs(a: PreTrainedTokenizerBase, b: PreTrainedTokenizerBase, show: int = 3) -> str:
    """'' when both map the same tokens to the same ids, else a short description of the difference."""
    va, vb = a.get_vocab(), b.get_vocab()
    if va == vb:
        return ""
    parts = [f"{len(va)} vs {len(vb)} tokens"]
    only_a = sorted(set(va) - set(vb))[:show]
    only_b = sorted(set(vb) - set(va))[:show]
    moved = sorted(t for t in set(va) & set(vb) if va[t] != vb[t])[:show]
    if only_a:
        parts.append(f"only in the first: {only_a}")
    if only_b:
        parts.append(f"only in the second: {only_b}")
    if moved:
        parts.append("different ids for " + ", ".join(f"{t!r} ({va[t]} vs {vb[t]})" for t in moved))
    return "; ".join(parts)


def cut_vocab(logits: Tensor, vocab_size: int) -> Tensor:
    """Logits [B, T, V_model] -> [B, T, vocab_size]: padded embedding rows never enter a softmax.

    A view (no copy); rows beyond the tokenizer's size would otherwise take probability mass.
    """
    if logits.shape[-1] < vocab_size:
        raise ValueError(f"model has {logits.shape[-1]} output rows but the tokenizer has {vocab_size} tokens")
    return logits[..., :vocab_size]


def damaged_weights(folder: Path) -> str | None:
    """'FILE is corrupt or truncated (why)' for the first unreadable safetensors file in `folder`."""
    for path in sorted(folder.glob("*.safetensors")):
        try:
            with safe_open(str(path), framework="pt") as fh:
                for name in fh.keys():
                    fh.get_slice(name)
        except Exception as exc:  # noqa: BLE001  safetensors raises its own error type
            return f"{path} is corrupt or truncated ({str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__})"
    return None


def load_model(model: str, revision: str | None, dtype: torch.dtype, trust_remote_code: bool, label: str) -> PreTrainedModel:
    """from_pretrained, with load failures turned into one line that names the file."""
    warn_remote_code(label, model, trust_remote_code)
    try:
        return AutoModelForCausalLM.from_pretrained(
            model, revision=revision, dtype=dtype, trust_remote_code=trust_remote_code
        )
    except (OSError, ValueError, SafetensorError) as exc:
        damaged = damaged_weights(Path(model)) if Path(model).is_dir() else None
        if damaged:
            raise UserError(f"{label}: {damaged}; copy or download the model again") from None
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"{label}: cannot load model {model!r}: {first}") from None


def freeze(model: nn.Module) -> nn.Module:
    """Teachers: eval mode, no gradients."""
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def teacher_dtype(spec: TeacherSpec, precision: str) -> torch.dtype:
    return DTYPES[spec.dtype or precision]


def load_teacher(spec: TeacherSpec, precision: str) -> PreTrainedModel:
    return freeze(load_model(spec.model, spec.revision, teacher_dtype(spec, precision), spec.trust_remote_code,
                             f"teachers[{spec.name}]"))


def self_teacher(student: PreTrainedModel, dtype: torch.dtype) -> nn.Module:
    """A frozen copy of the student's initial weights (no second load from disk or hub). A LoRA
    student's base is frozen already and *is* its initial weights: the teacher shares it."""
    if isinstance(student, PeftModel):
        return LoraBase(student)
    return freeze(copy.deepcopy(student).to(dtype))


class LoraBase(nn.Module):
    """The `self` teacher of a LoRA student: the student's own frozen base, run with its adapters
    disabled (peft's `disable_adapter`), so the base weights are held once. The student is held by
    reference outside the module tree, so freezing, placing or switching this teacher to eval mode
    (prepare_teacher) never touches the student; the forward runs the student in eval mode (no
    dropout, as a teacher) and restores its mode. It computes in the student's dtype."""

    def __init__(self, student: PeftModel):
        super().__init__()
        self._student = (student,)
        self.config = student.config

    def forward(self, **kwargs):
        student = self._student[0]
        was_training = student.training
        student.eval()
        try:
            with student.disable_adapter():
                return student(**kwargs)
        finally:
            student.train(was_training)


def load_teachers(recipe: Recipe, specs: list[TeacherSpec], student: PreTrainedModel | None,
                  init_context: Callable[[torch.dtype], AbstractContextManager] = lambda dtype: nullcontext()
                  ) -> list[PreTrainedModel]:
    """The teachers `specs` (from the recipe), in order: `model: self` is a frozen copy of
    `student` (its initial weights; needed only then), any other is loaded inside
    init_context(its dtype) (ZeRO-3 partitioning as it loads)."""
    models = []
    for spec in specs:
        dtype = teacher_dtype(spec, recipe.train.precision)
        if spec.model == SELF_TEACHER:
            assert student is not None, "a self teacher needs the student"
            models.append(self_teacher(student, dtype))
            continue
        with init_context(dtype):
            models.append(load_teacher(spec, recipe.train.precision))
    return models


def _decoder_layers(model: PreTrainedModel) -> tuple[nn.Module, str]:
    base = model.get_decoder() if hasattr(model, "get_decoder") else model.base_model
    for name in ("layers", "h", "blocks"):
        if isinstance(getattr(base, name, None), nn.ModuleList):
            return base, name
    raise UserError(f"student.from_teacher: cannot find the decoder layers of {type(model).__name__}; "
                    "use student.from_config instead")


def layer_problems(layers: list[int], num_layers: int) -> list[str]:
    """student.from_teacher.layers that a teacher with num_layers decoder layers does not have."""
    bad = [i for i in layers if not -num_layers <= i < num_layers]
    return [f"student.from_teacher.layers: {bad} out of range; the teacher has layers 0..{num_layers - 1}"] if bad else []


def override_problems(config: PretrainedConfig, overrides: dict) -> list[str]:
    """student.from_config.overrides that are not fields of `config`."""
    unknown = [k for k in overrides if not hasattr(config, k)]
    if not unknown:
        return []
    return [f"student.from_config.overrides: {unknown} are not fields of {type(config).__name__}; "
            "check the spelling against the base model's config.json"]


def student_from_teacher(teacher: PreTrainedModel, layers: list[int]) -> PreTrainedModel:
    """A copy of the teacher keeping only `layers` (in that order); embeddings, norm and head kept."""
    student = copy.deepcopy(teacher).float()
    base, attr = _decoder_layers(student)
    old = getattr(base, attr)
    problems = layer_problems(layers, len(old))
    if problems:
        raise UserError(problems)
    kept = nn.ModuleList(old[i] for i in layers)
    for new_index, layer in enumerate(kept):
        attn = getattr(layer, "self_attn", None)
        if attn is not None and hasattr(attn, "layer_idx"):
            attn.layer_idx = new_index  # the KV cache indexes layers by position
    setattr(base, attr, kept)
    student.config.num_hidden_layers = len(layers)
    if getattr(student.config, "layer_types", None):
        student.config.layer_types = [student.config.layer_types[i] for i in layers]
    for p in student.parameters():
        p.requires_grad_(True)
    return student.train()


def student_from_config(base: str, overrides: dict, dtype: torch.dtype, seed: int) -> PreTrainedModel:
    try:
        config = AutoConfig.from_pretrained(base)
    except (OSError, ValueError) as exc:
        raise UserError(f"student.from_config.base: cannot read a config from {base!r}: {exc}") from None
    problems = override_problems(config, overrides)
    if problems:
        raise UserError(problems)
    for key, value in overrides.items():
        setattr(config, key, value)
    torch.manual_seed(seed)
    try:
        return AutoModelForCausalLM.from_config(config, dtype=dtype)
    except (ValueError, AssertionError) as exc:
        raise UserError(f"student.from_config.overrides: the resulting config is invalid: {exc}") from None


def load_student(recipe: Recipe) -> PreTrainedModel:
    """The student in float32 master weights (mixed precision is applied by accelerate).

    `from_teacher` loads that teacher once more, whole and unpartitioned, to copy its layers
    (teachers themselves may be partitioned as they load under ZeRO-3).
    """
    spec = recipe.student
    if spec.model is not None:
        model = load_model(spec.model, spec.revision, torch.float32, spec.trust_remote_code, "student.model")
    elif spec.from_teacher is not None:
        source = next(t for t in recipe.teachers if t.name == spec.from_teacher.teacher)
        teacher = load_model(source.model, source.revision, torch.float32, source.trust_remote_code,
                             f"student.from_teacher ({source.name})")
        model = student_from_teacher(teacher, spec.from_teacher.layers)
        del teacher
    else:
        init = spec.from_config
        base = next((t.model for t in recipe.teachers if t.name == init.base), init.base)
        model = student_from_config(base, init.overrides, torch.float32, recipe.train.seed)
    model.train()
    for p in model.parameters():
        p.requires_grad_(True)
    if spec.lora is not None:
        model = with_lora(model, spec.lora)
    return model


def with_lora(model: PreTrainedModel, lora: LoraSection) -> PeftModel:
    """The model with LoRA adapters on `lora.target_modules` (peft); only the adapters train."""
    config = LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                        target_modules=list(lora.target_modules), task_type="CAUSAL_LM")
    return get_peft_model(model, config)


def merge_lora_state(state: dict[str, Tensor], lora: LoraSection) -> dict[str, Tensor]:
    """A PeftModel's full state dict -> the plain model's, each adapted weight merged:
    W + (alpha / r) B A, computed in float32 and stored in W's dtype (peft's own merge rule)."""
    scale = lora.alpha / lora.r
    prefix = "base_model.model."
    out = {}
    for key, value in state.items():
        if ".lora_" in key:
            continue
        if key.endswith(".base_layer.weight"):
            stem = key[: -len(".base_layer.weight")]
            a, b = state[f"{stem}.lora_A.default.weight"], state[f"{stem}.lora_B.default.weight"]
            value = (value.float() + scale * (b.float() @ a.float())).to(value.dtype)
        out[key.removeprefix(prefix).replace(".base_layer.", ".")] = value
    return out


def linear_module_names(config: PretrainedConfig) -> list[str]:
    """The last name part of every linear layer of a model built from `config` (on the meta device:
    no memory, no weights): what LoRA's target_modules may name."""
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config)
    return sorted({name.rsplit(".", 1)[-1] for name, module in model.named_modules() if isinstance(module, nn.Linear)})


def tokenizer_source(recipe: Recipe) -> tuple[str, str | None, bool]:
    """Where the student's tokenizer comes from (the run's tokenizer): the student model, the teacher
    it is cut from, or the model whose config it is built from (a teacher's name or a folder)."""
    spec = recipe.student
    if spec.model:
        return spec.model, spec.revision, spec.trust_remote_code
    by_name = {t.name: t for t in recipe.teachers}
    name = spec.from_teacher.teacher if spec.from_teacher is not None else spec.from_config.base  # type: ignore[union-attr]
    teacher = by_name.get(name)
    if teacher is not None:
        return teacher.model, teacher.revision, teacher.trust_remote_code
    return name, None, False


@lru_cache(maxsize=16)
def _differs(student: tuple[str, str | None], teacher: tuple[str, str | None]) -> bool:
    try:
        return bool(compare_vocabs(load_tokenizer(*student), load_tokenizer(*teacher)))
    except Exception:  # noqa: BLE001  unreadable tokenizers are reported by the file checks
        return False


def cross_tokenizer_teachers(recipe: Recipe) -> list[str]:
    """Names of the teachers whose tokenizer differs from the student's (a `self` teacher never does)."""
    student = tokenizer_source(recipe)[:2]
    return [t.name for t in recipe.teachers if t.model != SELF_TEACHER and _differs(student, (t.model, t.revision))]


def aligned_teachers(recipe: Recipe) -> list[str]:
    """Names of the teachers that go through the alignment across tokenizers: those with another
    tokenizer, or every teacher under `align.force`."""
    cross = set(cross_tokenizer_teachers(recipe))
    return [t.name for t in recipe.teachers if recipe.align.force or t.name in cross]


@contextmanager
def hidden_before_head(model: nn.Module) -> Iterator[list[Tensor]]:
    """While active, the model's output head (lm_head) is handed only each row's last position,
    and the final hidden states [B, T, H] it was given are captured into the yielded list: a
    forward then builds [B, 1, V] logits instead of [B, T, V] (train.fused_loss: the loss makes
    its logits from the captured states, chunk by chunk)."""
    captured: list[Tensor] = []

    def keep_last(module: nn.Module, args: tuple) -> tuple:
        captured.append(args[0])
        return (args[0][:, -1:], *args[1:])

    handle = model.get_output_embeddings().register_forward_pre_hook(keep_last)
    try:
        yield captured
    finally:
        handle.remove()


def logit_softcap(model: nn.Module) -> float | None:
    """The final logit soft-cap a model applies after its head (Gemma 2/3), or None."""
    config = getattr(model, "config", None)
    for part in (config, getattr(config, "text_config", None)):
        cap = getattr(part, "final_logit_softcapping", None)
        if cap:
            return float(cap)
    return None
