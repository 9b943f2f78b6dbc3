"""`merge-distill init`: a commented recipe from the models and data a user has.

Defaults are picked from what the files say:
- data.seq_len: 512, or less when a model's context window is shorter;
- student: `from_teacher` keeps the first teacher's first half of its layers (its weights, its
  tokenizer), `from_config` builds a random model of that half depth, a path starts from that model;
- routing: one teacher -> `uniform` (classic distillation); several -> `ce` per token, which needs
  no domain tags (a `domain` router would need a teacher per domain);
- each data source: its type from the file (jsonl, parquet, text folder/file, else a hub dataset),
  and for jsonl the field and format from the first line (`messages` -> chat, else `text`);
- train.lr: 2e-4 from pretrained weights, 1e-3 from a random init.
Paths in the recipe are relative to the recipe file, as `load_recipe` reads them.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

from transformers import AutoConfig

from merge_distill.errors import UserError
from merge_distill.schema.recipe import NAME_PATTERN

DEFAULT_SEQ_LEN = 512
STUDENT_KINDS = ("from_teacher", "from_config")


@dataclass
class DataSpec:
    path: str
    domain: str


def parse_teacher(value: str) -> tuple[str, str]:
    name, sep, path = value.partition("=")
    if not sep or not name or not path:
        raise UserError(f"--teacher {value!r}: give NAME=PATH, e.g. --teacher code=models/coder")
    if not re.match(NAME_PATTERN, name):
        raise UserError(f"--teacher {value!r}: the name may use letters, digits, '_', '.', '-' and must start with a "
                        "letter or digit")
    return name, path


def parse_data(value: str) -> DataSpec:
    """PATH or PATH:DOMAIN (a hub dataset name works as PATH)."""
    path, sep, domain = value.rpartition(":")
    if not sep or not re.match(NAME_PATTERN, domain) or Path(value).exists():
        path, domain = value, re.sub(r"[^A-Za-z0-9_.-]", "_", Path(value.rstrip("/")).stem) or "data"
    return DataSpec(path, domain)


def _config(path: str, label: str):
    try:
        return AutoConfig.from_pretrained(path)
    except Exception as exc:  # noqa: BLE001  any failure to read a model is the user's path
        raise UserError(f"{label} {path!r}: cannot read its config.json ({type(exc).__name__}: {exc}); give a model "
                        "directory or a hub id") from None


def _context(config) -> int | None:
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length"):
        value = getattr(config, key, None) or getattr(getattr(config, "text_config", None), key, None)
        if isinstance(value, int):
            return value
    return None


def _layers(config) -> int:
    return int(getattr(config, "num_hidden_layers", None) or getattr(config, "text_config").num_hidden_layers)


def _source_lines(spec: DataSpec, where: Path) -> list[str]:
    """The YAML lines of one data source (after `- `)."""
    local = Path(spec.path)
    rel = os.path.relpath(local.resolve(), where) if local.exists() else spec.path
    if not local.exists():
        return [f"{{type: hub, path: {spec.path}, domain: {spec.domain}}}   # a hub dataset (split: train)"]
    if local.is_dir() or local.suffix in (".txt", ".md", ".py"):
        return [f"{{type: text, path: {rel}, domain: {spec.domain}}}"]
    if local.suffix == ".parquet":
        return [f"{{type: parquet, path: {rel}, domain: {spec.domain}}}"]
    if local.suffix not in (".jsonl", ".json"):
        raise UserError(f"--data {spec.path!r}: unknown file type {local.suffix!r}; give .jsonl, .parquet, .txt or a folder")
    first = next((line for line in local.read_text(encoding="utf-8").splitlines() if line.strip()), "")
    try:
        row = json.loads(first)
    except json.JSONDecodeError:
        raise UserError(f"--data {spec.path!r} line 1 is not JSON; jsonl needs one JSON object per line") from None
    if not isinstance(row, dict):
        raise UserError(f"--data {spec.path!r} line 1 is not a JSON object")
    if isinstance(row.get("messages"), list):
        return [f"{{type: jsonl, path: {rel}, field: messages, format: chat, domain: {spec.domain}}}"
                "   # chat: loss on the assistant's turns"]
    field = "text" if "text" in row else next((k for k, v in row.items() if isinstance(v, str)), None)
    if field is None:
        raise UserError(f"--data {spec.path!r}: line 1 has no text field (a string) and no `messages` list")
    return [f"{{type: jsonl, path: {rel}, field: {field}, domain: {spec.domain}}}"]


def recipe_text(out: Path, teachers: list[tuple[str, str]], student: str, data: list[DataSpec]) -> str:
    """The commented recipe that `merge-distill init` writes to `out`."""
    if not teachers:
        raise UserError("give at least one --teacher NAME=PATH")
    if not data:
        raise UserError("give at least one --data PATH[:DOMAIN]")
    names = [n for n, _ in teachers]
    if len(set(names)) != len(names):
        raise UserError(f"--teacher names must differ; given {names}")
    where = out.resolve().parent

    def rel(path: str) -> str:
        return os.path.relpath(Path(path).resolve(), where) if Path(path).exists() else path

    configs = {name: _config(path, f"--teacher {name}") for name, path in teachers}
    first, first_path = teachers[0]
    half = max(1, _layers(configs[first]) // 2)
    if student == "from_teacher":
        student_lines = [f"  from_teacher: {{teacher: {first}, layers: {list(range(half))}}}   "
                         f"# the first {half} of {first}'s {_layers(configs[first])} layers, its tokenizer"]
        pretrained = True
    elif student == "from_config":
        student_lines = [f"  from_config: {{base: {first}, overrides: {{num_hidden_layers: {half}}}}}   "
                         f"# random init, {first}'s config at half depth"]
        pretrained = False
    else:
        contexts_student = _config(student, "--student")
        configs["(student)"] = contexts_student
        student_lines = [f"  model: {rel(student)}"]
        pretrained = True
    contexts = [c for c in map(_context, configs.values()) if c]
    seq_len = min([DEFAULT_SEQ_LEN, *contexts])
    domains = sorted({d.domain for d in data})
    routing = (["  kind: uniform   # one teacher: classic distillation"] if len(teachers) == 1 else
               ["  kind: ce        # per token, the teacher with the lowest NLL of the next token weighs most",
                "  tau: 1.0        # softmax temperature over the teachers' NLL; lower = harder choice"])
    lines = [
        f"# Written by `merge-distill init`; check it with `merge-distill validate {out.name}`.",
        "# Every key: `merge-distill schema`, or docs in the README.",
        f"name: {out.stem}",
        "teachers:",
        *[f"  - {{name: {name}, model: {rel(path)}}}" for name, path in teachers],
        "student:",
        *student_lines,
        "data:",
        f"  seq_len: {seq_len}   # tokens per row: at most every model's context window ({min(contexts) if contexts else 'unknown'})",
        "  train:",
        *[f"    - {line}" for spec in data for line in _source_lines(spec, where)],
        "  # eval: held-out sources in the same form; the end-of-run report then compares the student with",
        "  # every teacher per domain (bits per byte, perplexity)",
        "routing:",
        *routing,
        "loss:",
        "  kind: forward_kl   # also reverse_kl, jsd, skew_kl, tvd",
        "  temperature: 1.0",
        "train:",
        "  steps: 1000",
        "  micro_batch_size: 8",
        f"  lr: {'2.0e-4' if pretrained else '1.0e-3'}   # {'from pretrained weights' if pretrained else 'from a random init'}",
        "  warmup_steps: 20",
        "  schedule: cosine",
        "  seed: 0",
        "  log_every: 10",
        "output:",
        f"  dir: runs/{out.stem}",
        "  save_every: 200   # checkpoints for --resume",
        "  # report_to: [tensorboard]",
    ]
    if len(domains) > 1:
        lines.insert(lines.index("routing:"), f"# domains in the data: {', '.join(domains)} (the report breaks routing down by them)")
    return "\n".join(lines) + "\n"
