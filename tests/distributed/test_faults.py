"""Faults across processes, with a DeepSpeed student (ZeRO-2 and ZeRO-3) on 2 processes over gloo.

SIGKILL rank 1 in the middle of a run: the launch ends within 60 s and its error names rank 1.
`--resume` then continues from the newest checkpoint, and the student ends bit for bit equal to
that of an uninterrupted run.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import cli_env, cli_process, pico_recipe_dict, write_recipe

STEPS = 6


def _rank_pid(rank: int, launcher_pid: int) -> int | None:
    """The pid of the process of this launch that runs with RANK=rank (read from /proc)."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            environ = (entry / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"RANK={rank}".encode() in environ and any(v.startswith(b"MERGE_DISTILL_STATUS_DIR=") for v in environ):
            if _descends_from(int(entry.name), launcher_pid):
                return int(entry.name)
    return None


def _descends_from(pid: int, ancestor: int) -> bool:
    while pid > 1:
        if pid == ancestor:
            return True
        try:
            pid = int((Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            return False
    return False


@pytest.mark.parametrize("stage", [2, 3])
def test_sigkill_of_rank_1_stops_the_launch_and_resume_is_exact(pico, tmp_path, stage):
    recipe = pico_recipe_dict(pico, tmp_path / "run")
    recipe["train"].update(steps=STEPS, micro_batch_size=2, lr=5e-3, log_every=1)
    recipe["output"].update(save_every=2, keep_last=3)
    recipe["distributed"] = {"use_deepspeed": "always", "student_zero_stage": stage, "collective_timeout_s": 30}
    path = write_recipe(tmp_path / "r.yaml", recipe)

    full = cli_process(["launch", str(path), "--nproc", "2", f"output.dir={tmp_path / 'full'}"], tmp_path)
    assert full.returncode == 0, full.stdout[-3000:] + full.stderr[-3000:]

    cut = tmp_path / "cut"
    launcher = subprocess.Popen([sys.executable, "-m", "merge_distill.cli", "launch", str(path), "--nproc", "2",
                                 f"output.dir={cut}"], cwd=tmp_path, env=cli_env(), stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 600
    while time.time() < deadline and not (cut / "checkpoints" / "step-000002").is_dir():
        assert launcher.poll() is None, launcher.communicate()
        time.sleep(0.2)
    rows = (cut / "metrics.jsonl").read_text().splitlines() if (cut / "metrics.jsonl").exists() else []
    assert len(rows) < STEPS, "the run must still be going when rank 1 is killed"
    victim = _rank_pid(1, launcher.pid)
    assert victim is not None
    os.kill(victim, signal.SIGKILL)
    killed_at = time.time()
    out, err = launcher.communicate(timeout=120)
    took = time.time() - killed_at
    assert launcher.returncode != 0 and took < 60, (took, out[-2000:], err[-3000:])
    assert f"process rank 1 (pid {victim} on" in err and "died without reporting: killed (SIGKILL" in err, err[-3000:]
    assert "--resume" in err and "Traceback" not in err.split("error: process rank")[-1]
    facts = json.loads((cut / "run.json").read_text())
    assert facts["status"] != "complete"

    resumed = cli_process(["launch", str(path), "--nproc", "2", "--resume", f"output.dir={cut}"], tmp_path)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    want, got = (load_file(str(d / "student" / "model.safetensors")) for d in (tmp_path / "full", cut))
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    losses = [[json.loads(x)["loss"] for x in (d / "metrics.jsonl").read_text().splitlines()] for d in (tmp_path / "full", cut)]
    assert losses[0] == losses[1][-STEPS:] or losses[0][-2:] == losses[1][-2:]
