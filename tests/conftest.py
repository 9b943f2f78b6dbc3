"""Shared fixtures: pico models and data built offline once per test session."""

from __future__ import annotations

import os
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
