"""Shared fixtures: pico models and data built offline once per test session."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session", autouse=True)
def tokenized_store(tmp_path_factory) -> Path:
    """Tokenized rows of the whole session in one temporary store (not the user's ~/.cache);
    CLI subprocesses inherit it through the environment."""
    store = tmp_path_factory.mktemp("md-cache")
    os.environ["MERGE_DISTILL_CACHE"] = str(store)
    return store / "tokenized"


@pytest.fixture(scope="session")
def pico(tmp_path_factory) -> dict[str, Path]:
    from merge_distill.pico import build_pico

    return build_pico(tmp_path_factory.mktemp("pico"))


@pytest.fixture(scope="module")
def sp_teacher(tmp_path_factory):
    """A pico teacher with a SentencePiece tokenizer of its own (and 8 padded embedding rows)."""
    from merge_distill.pico import build_sentencepiece_tokenizer, pico_llama, prose_texts, stdlib_texts

    folder = tmp_path_factory.mktemp("sp_teacher")
    tokenizer = build_sentencepiece_tokenizer(stdlib_texts(30) + prose_texts(30), 500, folder)
    pico_llama(len(tokenizer) + 8, seed=11, layers=2).save_pretrained(folder)
    return folder


def pico_recipe_dict(pico: dict[str, Path], out_dir: Path, **sections) -> dict:
    """A small valid two-teacher recipe on the pico assets; `sections` replace top-level keys."""
    recipe = {
        "name": "pico",
        "teachers": [
            {"name": "code", "model": str(pico["teacher_a"])},
            {"name": "prose", "model": str(pico["teacher_b"])},
        ],
        "student": {"model": str(pico["student"])},
        "data": {
            "seq_len": 32,
            "train": [
                {"type": "jsonl", "path": str(pico["code"]), "domain": "code"},
                {"type": "jsonl", "path": str(pico["prose"]), "domain": "prose"},
            ],
        },
        "routing": {"kind": "uniform"},
        "loss": {"kind": "forward_kl"},
        "train": {"steps": 3, "micro_batch_size": 2, "lr": 1e-3, "seed": 0, "log_every": 1},
        "output": {"dir": str(out_dir)},
    }
    recipe.update(sections)
    return recipe


def write_recipe(path: Path, recipe: dict) -> Path:
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


@pytest.fixture
def make_recipe(pico, tmp_path):
    """make_recipe(**sections) -> path of a valid pico recipe with those sections replaced."""

    def make(name: str = "recipe.yaml", **sections) -> Path:
        return write_recipe(tmp_path / name, pico_recipe_dict(pico, tmp_path / "run", **sections))

    return make


@pytest.fixture
def cached_recipe(pico, make_recipe, tmp_path):
    """cached_recipe(**cache_fields) -> recipe path: pico teachers, 3 + 3 short examples, a cache section
    (top-k unless cache_fields say otherwise: auto would store these small teachers' hidden states)."""

    def make(name: str = "recipe.yaml", **fields):
        data = {"seq_len": 32, "train": [
            {"type": "jsonl", "path": str(pico["code"]), "domain": "code", "max_examples": 3},
            {"type": "jsonl", "path": str(pico["prose"]), "domain": "prose", "max_examples": 3}]}
        section = {"dir": str(tmp_path / "cache"), "k": 8, "rows_per_shard": 16, "store": "topk", **fields}
        return make_recipe(name, data=data, cache=section,
                           train={"steps": 3, "micro_batch_size": 4, "lr": 1e-3, "seed": 0, "log_every": 1})

    return make


def cli_env() -> dict:
    """The environment of a `python -m merge_distill.cli` subprocess: this venv's tools first on
    PATH (the launchers), this checkout importable."""
    return dict(os.environ, PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}",
                PYTHONPATH=str(Path(__file__).resolve().parents[1]))


def cli_process(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    """`merge-distill ARGS` in a subprocess (launches of several processes), output captured."""
    return subprocess.run([sys.executable, "-m", "merge_distill.cli", *args], cwd=cwd, env=cli_env(),
                          capture_output=True, text=True, timeout=900)


def run_cli(args: list[str], monkeypatch, capsys) -> tuple[int, str]:
    """Run `merge-distill ARGS` in this process; (exit code, everything printed). A command
    that succeeds returns from main() (code 0); one that fails exits with its code."""
    from merge_distill.cli import main

    monkeypatch.setattr(sys, "argv", ["merge-distill", *args])
    try:
        main()
        code = 0
    except SystemExit as exc:
        code = int(exc.code or 0)
    captured = capsys.readouterr()
    return code, captured.out + captured.err


@pytest.fixture
def one_thread():
    """The machine's cores are shared: two intra-op threads stall each other on every tiny
    matmul (pico forwards and small Adam steps run many times slower); one thread gives the
    same numbers, fast."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
