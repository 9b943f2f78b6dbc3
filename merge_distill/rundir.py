"""The run directory: creation rules, atomic JSON writes, the model card.

Layout: recipe.yaml (resolved), run.json (facts), metrics.jsonl (one line per step),
stats.json (routing statistics), student/ (save_pretrained + tokenizer), router.safetensors
(a learned gate), eval.json, report.json, README.md (model card).
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from safetensors.torch import save_file

from merge_distill.errors import UserError

if TYPE_CHECKING:
    import torch

    from merge_distill.schema import Recipe

CHECKPOINTS = "checkpoints"  # the run directory's checkpoint folder (merge_distill/checkpoint.py)

_UMASK = os.umask(0o022)  # read the process umask (the only way is to set it) and put it back
os.umask(_UMASK)


def storage_error(exc: OSError, path: Path, what: str) -> UserError:
    """A failed write in the user's words: which file, why, what to do."""
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return UserError(f"{path}: the disk is full (or over quota) while writing {what}; free some "
                         "space (or choose an output.dir on a larger disk) and run again, with --resume to continue "
                         "from the last complete checkpoint")
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return UserError(f"{path}: not allowed to write {what} ({exc.strerror}); choose a writable output.dir")
    return UserError(f"{path}: cannot write {what}: {exc.strerror or exc}; check the disk and output.dir")


def write_text_atomic(path: Path, text: str) -> None:
    """Write to a temporary file in the same folder, flush, fsync, then rename over `path`:
    a reader sees the old content or the new, never a part."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~_UMASK)  # mkstemp makes 0600 files; give the usual permissions
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(exc, OSError):
            raise storage_error(exc, path, path.name) from None
        raise


def write_json_atomic(path: Path, data: Any) -> None:
    write_text_atomic(path, json.dumps(data, indent=2, sort_keys=False))


def is_run_dir(path: Path) -> bool:
    return (path / "run.json").is_file() or (path / "metrics.jsonl").is_file()


def run_dir_problems(run_dir: Path, overwrite: bool, resume: bool = False) -> list[str]:
    """Why output.dir cannot take this run (empty when it can); `validate` and `run` both ask."""
    if overwrite and resume:
        return ["--resume and --overwrite contradict each other: --resume continues the run in "
                "output.dir, --overwrite deletes it; pass one of them"]
    if run_dir.exists() and not run_dir.is_dir():
        return [f"output.dir: {run_dir} is a file, not a folder; choose another output.dir"]
    if resume:
        return [] if is_run_dir(run_dir) else [f"--resume: {run_dir} holds no run to resume; run without --resume to start one"]
    if run_dir.is_dir() and any(run_dir.iterdir()):
        if not is_run_dir(run_dir):
            if overwrite:
                return [f"output.dir: {run_dir} holds files that are not a merge-distill run; "
                        "refusing to delete them even with --overwrite; choose another folder"]
            return [f"output.dir: {run_dir} already holds files; pass --overwrite to replace it, "
                    f"or choose a new folder (e.g. output.dir={run_dir.name}-2 on the command line)"]
        if not overwrite:
            if (run_dir / CHECKPOINTS).is_dir():
                return [f"output.dir: {run_dir} already holds a run with checkpoints; pass --resume to continue it, "
                        "or --overwrite to delete it and start again"]
            return [f"output.dir: {run_dir} already holds a run; pass --overwrite to replace it, "
                    f"or choose a new folder (e.g. output.dir={run_dir.name}-2 on the command line)"]
    existing = next((q for q in [run_dir, *run_dir.parents] if q.exists()), None)
    if existing is not None and not existing.is_dir():
        return [f"output.dir: cannot create {run_dir}: {existing} is a file, not a folder; choose another output.dir"]
    if existing is not None and not os.access(existing, os.W_OK | os.X_OK):
        return [f"output.dir: cannot write to {run_dir}: {existing} is not writable; choose a writable folder"]
    return []


def prepare_run_dir(run_dir: Path, overwrite: bool, resume: bool = False) -> None:
    """Create the run directory; an existing run is replaced only with an explicit overwrite,
    continued only with an explicit resume."""
    problems = run_dir_problems(run_dir, overwrite, resume)
    if problems:
        raise UserError(problems)
    if resume:
        return
    if run_dir.is_dir() and any(run_dir.iterdir()):
        shutil.rmtree(run_dir)  # an existing run, with --overwrite (run_dir_problems refused the rest)
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe = run_dir / ".write-test"
        probe.write_text("ok")
        probe.unlink()
    except OSError as exc:
        raise UserError(f"output.dir: cannot write to {run_dir}: {exc.strerror}; choose a writable folder") from None


def append_jsonl(path: Path, row: dict[str, Any]) -> None:
    try:
        with open(path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(row) + "\n")
            fh.flush()
    except OSError as exc:
        raise storage_error(exc, path, "a metrics row") from None


def model_card(recipe: "Recipe", facts: dict[str, Any], final: dict[str, Any]) -> str:
    teachers = "\n".join(f"- `{t.name}`: {t.model}" for t in recipe.teachers)
    data = "\n".join(f"- `{s.label}` ({s.type}, domain `{s.domain}`, weight {s.weight}): {s.path}" for s in recipe.data.train)
    metrics = "\n".join(f"- {k}: {v:.4g}" if isinstance(v, float) else f"- {k}: {v}" for k, v in final.items())
    routing = recipe.routing.model_dump(exclude_defaults=False)
    return f"""---
library_name: transformers
tags: [distillation, merge-distill]
---
# {recipe.name}: distilled student

Trained with merge-distill from {len(recipe.teachers)} teacher(s), blended per token.

## Teachers
{teachers}

## Routing and loss
- routing: `{routing}`
- loss: `{recipe.loss.model_dump()}`

## Data (seq_len {recipe.data.seq_len}, packing {recipe.data.packing})
{data}

## Training
- steps: {facts.get('steps_done')} of {facts.get('steps_planned')}, tokens seen: {facts.get('tokens_seen')}
- recipe hash: `{facts.get('recipe_hash', '')[:12]}`, world size: {facts.get('world_size')}

## Final metrics
{metrics}

Load it with `AutoModelForCausalLM.from_pretrained("<this folder>")`.
"""


def save_router(router: "torch.nn.Module", path: Path) -> None:
    """A router's learned weights as safetensors (router.safetensors, in a run or a checkpoint)."""
    save_file({k: v.detach().cpu().contiguous() for k, v in router.state_dict().items()}, str(path))
