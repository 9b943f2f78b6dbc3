"""What each process of a launch reports about itself, so `merge-distill launch` can name the
ones that failed.

`merge-distill launch` creates a folder and passes it to every process in $MERGE_DISTILL_STATUS_DIR.
Each process writes rank-<RANK>.json there when it starts ({"state": "running"}, with its pid and
host). It writes again when it ends: "finished", "exited N", or "failed" with the error's
first line. A process killed by SIGKILL, the kernel's OOM killer or a lost node never writes the
second time. After the launcher returns non-zero, `launch` reads the folder: a rank still
"running" ended without a word, and the error says so by rank.
"""

from __future__ import annotations

import json
import os
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

STATUS_ENV = "MERGE_DISTILL_STATUS_DIR"


def _write(folder: Path, rank: int, state: str, detail: str = "") -> None:
    path = folder / f"rank-{rank}.json"
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"rank": rank, "pid": os.getpid(), "host": socket.gethostname(), "state": state,
                               "detail": detail}))
    os.replace(tmp, path)


@contextmanager
def reported() -> Iterator[None]:
    """Around a command's whole life in one process; does nothing outside `merge-distill launch`."""
    where = os.environ.get(STATUS_ENV)
    if not where:
        yield
        return
    folder, rank = Path(where), int(os.environ.get("RANK", "0"))
    _write(folder, rank, "running")
    try:
        yield
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        _write(folder, rank, "finished" if code == 0 else f"exited {code}")
        raise
    except BaseException as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        _write(folder, rank, "failed", f"{type(exc).__name__}: {first}"[:300])
        raise
    _write(folder, rank, "finished")


def failures(folder: Path, world: int | None) -> list[str]:
    """One line per process that did not finish: by rank, what it reported (or that it could not).
    world: the ranks 0..world-1 all run here (one node); None: only those that reported here."""
    found = sorted(int(p.stem.split("-")[1]) for p in folder.glob("rank-*.json"))
    lines = []
    for rank in (range(world) if world is not None else found):
        path = folder / f"rank-{rank}.json"
        if not path.is_file():
            lines.append(f"process rank {rank} never started")
            continue
        status = json.loads(path.read_text())
        where = f"(pid {status['pid']} on {status['host']})"
        if status["state"] == "running":
            lines.append(f"process rank {rank} {where} died without reporting: killed (SIGKILL, out of memory "
                         "or a lost node)")
        elif status["state"] == "failed":
            lines.append(f"process rank {rank} {where} failed: {status['detail']}")
        elif status["state"] != "finished":
            lines.append(f"process rank {rank} {where} {status['state']}")
    return lines
