"""Checkpoints: save everything a run needs to continue exactly, and find the newest good one.

A checkpoint is a folder run_dir/checkpoints/step-000120 (120 optimizer steps done, so step
index 120 is the next one to run). It holds

    model.safetensors, optimizer.bin, scheduler.bin, random_states_<rank>.pkl
                         accelerate's save_state (under DeepSpeed: the engine's own partitioned
                         checkpoint in pytorch_model/ instead of the first two)
    rank-<rank>.json     this process's RNG states (python, numpy, torch, CUDA) and BlendStats sums
    router.safetensors, router_optimizer.pt     a learned gate and its AdamW state (if any)
    state.json           the run facts: step, tokens_seen, skipped_steps, elapsed wall time, the
                         resolved recipe and its hash, world size
    manifest.json        every other file with its size in bytes; written last

The data position needs no state: MixedStream gives the rows of a step as a pure function of
the step index. Writes go to a hidden .tmp-step-000120 folder; every file is fsynced, the folder
is renamed into place, then the `latest` pointer file is replaced atomically. A checkpoint counts
as complete when its manifest verifies (every file present with its recorded size) and it loads;
resume takes the newest complete one and says which broken ones it skipped.
"""

from __future__ import annotations

import errno
import json
import os
import random
import shutil
import signal
import threading
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator
from pydantic import ValidationError
from rich.markup import escape
from safetensors import SafetensorError
from safetensors.torch import load_file

from merge_distill import distributed as dist_mod
from merge_distill.errors import UserError
from merge_distill.recorder import Recorder
from merge_distill.rundir import CHECKPOINTS, save_router, storage_error, write_text_atomic
from merge_distill.schema import Recipe
from merge_distill.training import Training


LATEST = "latest"
MANIFEST = "manifest.json"
STATE = "state.json"
FORMAT = 1
# Recipe keys that may change between a run and its resume: none of them changes the numbers of
# the steps already done (train.on_nonfinite lets a stopped run continue with skip; output.dir
# lets a run folder move to another disk).
RESUME_MAY_CHANGE = ("name", "train.log_every", "train.on_nonfinite", "output.dir", "output.save_every",
                     "output.keep_last")


@dataclass
class Progress:
    """How far a run got: `step` optimizer steps done (= the index of the next step)."""

    step: int = 0
    tokens_seen: int = 0
    skipped: int = 0
    elapsed_s: float = 0.0


def step_name(step: int) -> str:
    return f"step-{step:06d}"


def checkpoint_root(run_dir: Path) -> Path:
    return Path(run_dir) / CHECKPOINTS


def list_checkpoints(run_dir: Path) -> list[tuple[int, Path]]:
    """(step, folder) of every step-N folder, newest first (complete or not)."""
    root = checkpoint_root(run_dir)
    found = []
    for path in root.glob("step-*") if root.is_dir() else []:
        suffix = path.name.removeprefix("step-")
        if path.is_dir() and suffix.isdigit():
            found.append((int(suffix), path))
    return sorted(found, reverse=True)


def verify(folder: Path) -> str | None:
    """None when the manifest lists every file with its size, else what is wrong (one phrase)."""
    try:
        manifest = json.loads((folder / MANIFEST).read_text(encoding="utf-8"))
        files = dict(manifest["files"])
    except FileNotFoundError:
        return f"no {MANIFEST} (the write did not finish)"
    except (ValueError, KeyError, TypeError):
        return f"{MANIFEST} is damaged"
    for rel, size in files.items():
        path = folder / rel
        if not path.is_file():
            return f"{rel} is missing"
        if path.stat().st_size != size:
            return f"{rel} is truncated or damaged ({path.stat().st_size} of {size} bytes)"
    return None


# ---------------------------------------------------------------------------- RNG


def rng_state() -> dict[str, Any]:
    """Every generator a step could draw from, as plain JSON values."""
    py_version, py_state, py_gauss = random.getstate()
    np_kind, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    return {
        "python": [py_version, list(py_state), py_gauss],
        "numpy": [np_kind, np_keys.tolist(), int(np_pos), int(np_has_gauss), float(np_gauss)],
        "torch": torch.get_rng_state().tolist(),
        "cuda": [s.tolist() for s in torch.cuda.get_rng_state_all()] if torch.cuda.is_available() else [],
    }


def set_rng_state(state: dict[str, Any]) -> None:
    version, py_state, gauss = state["python"]
    random.setstate((version, tuple(py_state), gauss))
    kind, keys, pos, has_gauss, np_gauss = state["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, np_gauss))
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([torch.tensor(s, dtype=torch.uint8) for s in state["cuda"]])


# ---------------------------------------------------------------------------- saving


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)  # a folder too: its fsync makes its entries (renames) durable
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(folder: Path) -> None:
    """Flush every file and folder under `folder`, and `folder` itself, to the disk."""
    for path in sorted(folder.rglob("*")) + [folder]:
        _fsync(path)


def save(t: Training, recorder: Recorder, recipe: Recipe, progress: Progress) -> Path:
    """Write checkpoint step-<progress.step> (every process calls this); returns its folder."""
    acc, rank = t.accelerator, t.rank
    root = checkpoint_root(recorder.run_dir)
    final = root / step_name(progress.step)
    tmp = root / f".tmp-{final.name}"
    if t.is_main:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
    acc.wait_for_everyone()
    # Plain writes inside the temporary folder: the rename below is what makes them visible.
    try:
        acc.save_state(str(tmp))  # model, optimizer, scheduler, RNG; DeepSpeed's own format under ZeRO
        # save_state may leave the folder to the main process; this process's file must not race it
        tmp.mkdir(parents=True, exist_ok=True)
        per_rank = {"rng": rng_state(), "stats": recorder.stats.state_dict()}
        (tmp / f"rank-{rank}.json").write_text(json.dumps(per_rank), encoding="utf-8")
        if t.is_main:
            if t.router_optimizer is not None:
                save_router(t.router, tmp / "router.safetensors")
                torch.save(t.router_optimizer.state_dict(), tmp / "router_optimizer.pt")
            state = {"format": FORMAT, **asdict(progress), "world_size": t.world_size,
                     "started_at": recorder.facts.get("started_at"), "recipe_hash": recipe.content_hash(),
                     "recipe": recipe.model_dump(mode="json")}
            (tmp / STATE).write_text(json.dumps(state, indent=1), encoding="utf-8")
        acc.wait_for_everyone()
        if t.is_main:
            # Once every process has written: fsyncing while another process still writes could
            # list a file that it is about to replace (a race seen under load with 2 processes).
            _fsync_tree(tmp)
            files = {str(p.relative_to(tmp)): p.stat().st_size for p in sorted(tmp.rglob("*")) if p.is_file()}
            (tmp / MANIFEST).write_text(json.dumps({"step": progress.step, "files": files}, indent=1))
            _fsync(tmp / MANIFEST)
            _fsync(tmp)
            if final.exists():  # a broken checkpoint of the same step, left by an earlier attempt
                shutil.rmtree(final)
            os.replace(tmp, final)
            _fsync(root)
            write_text_atomic(root / LATEST, final.name + "\n")
            prune(root, recipe.output.keep_last)
    except Exception as exc:
        if t.is_main:
            shutil.rmtree(tmp, ignore_errors=True)  # never leave a part that could be taken for a checkpoint
        message = str(exc).lower()
        if isinstance(exc, OSError):
            raise storage_error(exc, final, "this checkpoint") from None
        if isinstance(exc, (SafetensorError, RuntimeError)) and ("space" in message or "write" in message):
            # safetensors and torch.save report a failed write as their own error types
            code = errno.ENOSPC if "space" in message else errno.EIO
            raise storage_error(OSError(code, str(exc).splitlines()[0]), final, "this checkpoint") from None
        raise
    acc.wait_for_everyone()
    return final


def prune(root: Path, keep_last: int) -> None:
    """Delete all but the newest `keep_last` checkpoints, and leftovers of interrupted writes."""
    for _, old in list_checkpoints(root.parent)[keep_last:]:
        shutil.rmtree(old, ignore_errors=True)
    for leftover in root.glob(".tmp-*"):
        shutil.rmtree(leftover, ignore_errors=True)


# ---------------------------------------------------------------------------- resuming


def _flatten(node: Any, prefix: str = "") -> dict[str, Any]:
    """{"train": {"lr": 1}} -> {"train.lr": 1}; lists index as teachers[0].model."""
    if isinstance(node, dict):
        out: dict[str, Any] = {}
        for k, v in node.items():
            out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    if isinstance(node, list) and node and all(isinstance(v, dict) for v in node):
        out = {}
        for i, v in enumerate(node):
            out.update(_flatten(v, f"{prefix}[{i}]"))
        return out
    return {prefix: node}


def recipe_differences(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """'key: A in the checkpoint, B now' for every key that differs and matters for resume.

    The saved recipe is read through today's schema first, so a section or key added since the
    checkpoint was written (absent there) counts as its default: only a changed value differs."""
    try:
        saved = Recipe.model_validate(saved).model_dump(mode="json")
    except ValidationError:  # a key this version no longer knows: compare the files as they are
        pass
    old, new = _flatten(saved), _flatten(current)
    lines = []
    for key in sorted(set(old) | set(new)):
        if key in RESUME_MAY_CHANGE or old.get(key, "(absent)") == new.get(key, "(absent)"):
            continue
        lines.append(f"{key}: {old.get(key, '(absent)')!r} in the checkpoint, {new.get(key, '(absent)')!r} now")
    return lines


def _read_state(folder: Path) -> dict[str, Any]:
    state = json.loads((folder / STATE).read_text(encoding="utf-8"))
    if state.get("format") != FORMAT:
        raise ValueError(f"{STATE} has format {state.get('format')!r}, this version reads {FORMAT}")
    return state


def check_compatible(folder: Path, state: dict[str, Any], recipe: Recipe, world_size: int) -> None:
    """Raise UserError when the checkpoint cannot continue with this recipe and launch."""
    if state["recipe_hash"] != recipe.content_hash():
        diffs = recipe_differences(state["recipe"], recipe.model_dump(mode="json"))
        if diffs:
            shown = "; ".join(diffs[:6]) + (f"; and {len(diffs) - 6} more" if len(diffs) > 6 else "")
            raise UserError(
                f"--resume: the recipe differs from the one {folder} was trained with: {shown}; undo the change "
                f"to continue exactly, or start again (--overwrite, or another output.dir). Only "
                f"{', '.join(RESUME_MAY_CHANGE)} may change on resume")
    if state["world_size"] != world_size:
        raise UserError(f"--resume: {folder} was written by {state['world_size']} process(es), this launch has "
                        f"{world_size}; launch with {state['world_size']} to continue exactly")


def check_resumable(run_dir: Path, recipe: Recipe, world_size: int) -> None:
    """Before anything is loaded or written: refuse --resume early when it cannot work."""
    found = list_checkpoints(run_dir)
    if not found:
        raise UserError(f"--resume: {run_dir} holds no checkpoint to resume from; run without --resume to start "
                        "(set output.save_every to write checkpoints during a run)")
    for _, folder in found:
        if verify(folder) is None:
            try:
                state = _read_state(folder)
            except (ValueError, KeyError, OSError):
                continue  # damaged: resume reports it and falls back
            check_compatible(folder, state, recipe, world_size)
            return
    # none verifies: `load` reports every reason


def _load_one(t: Training, recorder: Recorder, recipe: Recipe, folder: Path) -> Progress:
    """Restore everything from `folder` into the run's parts; raises on any damage."""
    state = _read_state(folder)
    check_compatible(folder, state, recipe, t.world_size)
    per_rank = json.loads((folder / f"rank-{t.rank}.json").read_text(encoding="utf-8"))
    t.accelerator.load_state(str(folder))
    if t.router_optimizer is not None:
        t.router.load_state_dict(load_file(str(folder / "router.safetensors"), device=str(t.accelerator.device)))
        t.router_optimizer.load_state_dict(torch.load(folder / "router_optimizer.pt", weights_only=True,
                                                      map_location=t.accelerator.device))
    recorder.stats.load_state_dict(per_rank["stats"])
    set_rng_state(per_rank["rng"])  # last: loading must not leave a different RNG state behind
    recorder.facts["started_at"] = state.get("started_at") or recorder.facts.get("started_at")
    return Progress(int(state["step"]), int(state["tokens_seen"]), int(state["skipped"]), float(state["elapsed_s"]))


def resume(t: Training, recorder: Recorder, recipe: Recipe, total_steps: int) -> Progress:
    """Load the newest complete checkpoint, say which broken ones were skipped, and make the run
    directory agree with it (metrics.jsonl cut to its step, `latest` pointing at it)."""
    console, run_dir = recorder.console, recorder.run_dir
    root = checkpoint_root(run_dir)
    broken: list[str] = []
    loaded: tuple[Path, Progress] | None = None
    for _, folder in list_checkpoints(run_dir):
        reason = verify(folder)
        if reason is None:
            try:
                loaded = (folder, _load_one(t, recorder, recipe, folder))
            except UserError:
                raise
            except Exception as exc:  # noqa: BLE001  damage the manifest cannot see (same size, bad bytes)
                first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
                reason = f"cannot be loaded ({type(exc).__name__}: {first[:200]})"
        # Every process must take the same checkpoint: one failure anywhere rejects it everywhere.
        failed = dist_mod.all_reduce_sum(t.accelerator, torch.tensor([float(reason is not None)]))
        if float(failed.sum()) == 0:
            break
        loaded = None
        broken.append(f"{folder.name}: {reason or 'cannot be loaded on another process'}")
        console.print(f"[yellow]{escape(f'checkpoint {folder} is incomplete or damaged: {reason}')}; "
                      "falling back to the previous one[/]", soft_wrap=True)
    if loaded is None:
        tried = "; ".join(broken) or "none found"
        raise UserError(f"--resume: no complete checkpoint in {root} ({tried}); start again with --overwrite")
    folder, progress = loaded
    if t.is_main:
        for step, other in list_checkpoints(run_dir):
            if step > progress.step:
                shutil.rmtree(other, ignore_errors=True)  # broken, and from the abandoned future
        prune(root, recipe.output.keep_last)
        write_text_atomic(root / LATEST, folder.name + "\n")
        truncate_metrics(run_dir / "metrics.jsonl", progress.step)
        recorder.facts.update(steps_done=progress.step, tokens_seen=progress.tokens_seen,
                              skipped_steps=progress.skipped, wall_time_s=progress.elapsed_s, status="running")
        recorder.write_facts()
    t.accelerator.wait_for_everyone()
    console.print(escape(f"resuming from {folder} (step {progress.step} of {total_steps})"), soft_wrap=True)
    return progress


def truncate_metrics(path: Path, step: int) -> None:
    """Keep the rows of steps <= `step` (later ones are recomputed); drop a half-written last line."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict) and int(row.get("step", 0)) <= step:
            kept.append(line + "\n")
    write_text_atomic(path, "".join(kept))


# ---------------------------------------------------------------------------- stopping safely


class RunInterrupted(Exception):
    """SIGINT/SIGTERM stopped the run at a step boundary after saving a checkpoint."""

    def __init__(self, signum: int, step: int, folder: Path | None):
        self.signum, self.step, self.folder = signum, step, folder
        self.exit_code = 128 + signum  # the shell's convention: 130 for SIGINT, 143 for SIGTERM
        super().__init__(f"interrupted by {signal.Signals(signum).name} after step {step}")


class StopSignals:
    """While active, SIGINT/SIGTERM only ask the loop to stop at the next step boundary; a second
    SIGINT stops at once (KeyboardInterrupt, no checkpoint). Inactive outside the main thread."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = signum

    def requested(self, accelerator: Accelerator) -> int | None:
        """The signal to stop for, agreed by all processes (one may have seen it a step later)."""
        if accelerator.num_processes == 1:
            return None if self.signum is None else int(self.signum)
        seen = torch.tensor([float(self.signum == signal.SIGINT), float(self.signum == signal.SIGTERM)])
        seen = dist_mod.all_reduce_sum(accelerator, seen).cpu()
        if seen[0] > 0:
            return int(signal.SIGINT)
        return int(signal.SIGTERM) if seen[1] > 0 else None

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
