"""Streamed sources (`streaming: true`): rows equal the stored path's packing of the stream's order,
the order is deterministic pass after pass, any row can be asked for again, a run resumes bitwise,
and what a stream cannot do is refused at validate naming the key."""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import datasets
import pytest
import torch
from rich.console import Console
from safetensors.torch import load_file
from transformers import AutoTokenizer

from conftest import pico_recipe_dict, run_cli, write_recipe
from merge_distill.checkpoint import LATEST, step_name
from merge_distill.engine import run
from merge_distill.errors import UserError
from merge_distill.recipe import load_recipe
from merge_distill.schema import DataSource
from merge_distill.signals import IGNORE_INDEX
from merge_distill.streaming import STREAM_BUFFER, StreamRows

TEXTS = [f"def f{i}(x):\n    return x * {i} + {i * i}\n" if i % 3 else f"Example {i}: the cat sat on mat {i}." for i in range(60)]


def _jsonl(path: Path, texts: list[str]) -> Path:
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return path


def _stream_order(path: Path, seed: int, epoch: int) -> list[str]:
    """The texts in the order the stream reads them: datasets' own buffer shuffle (the reference)."""
    stream = datasets.load_dataset("json", data_files=[str(path)], split="train", streaming=True)
    stream = stream.shuffle(seed=seed, buffer_size=STREAM_BUFFER)
    stream.set_epoch(epoch)
    return [example["text"] for example in stream]


def _packed(tok, texts: list[str], seq_len: int) -> torch.Tensor:
    """Plain reference packing: every text + EOS, concatenated, cut into rows (the tail dropped)."""
    flat = [t for ids in tok(texts, add_special_tokens=False)["input_ids"] for t in ids + [tok.eos_token_id]]
    return torch.tensor(flat[: len(flat) // seq_len * seq_len]).view(-1, seq_len)


@pytest.fixture
def tok(pico):
    return AutoTokenizer.from_pretrained(pico["tokenizer"])


def test_rows_are_the_packed_stream_pass_after_pass(tok, tmp_path):
    path = _jsonl(tmp_path / "d.jsonl", TEXTS)
    rows = StreamRows(DataSource(type="jsonl", path=str(path), domain="code", streaming=True), "data.train[0]",
                      tok, 16, True, seed=3)
    first, second = _packed(tok, _stream_order(path, 3, 0), 16), _packed(tok, _stream_order(path, 3, 1), 16)
    assert not torch.equal(first, second), "pass 1 is reshuffled"
    n = len(first)
    got = rows.take(range(n + 4))  # into pass 1
    assert torch.equal(got.input_ids, torch.cat([first, second[:4]]))
    assert bool((got.labels == got.input_ids).all()) and bool((got.attention_mask == 1).all())
    # any order, repeats, and a row behind the position (the stream restarts and reads up to it)
    again = rows.take([n + 1, 2, 2, 0])
    assert torch.equal(again.input_ids, torch.cat([second[1:2], first[2:3], first[2:3], first[0:1]]))
    # another reader with the same seed reads the same rows; another seed another order
    twin = StreamRows(DataSource(type="jsonl", path=str(path), domain="code", streaming=True), "k", tok, 16, True, seed=3)
    assert torch.equal(twin.take(slice(0, n)).input_ids, first) and twin.digest == rows.digest
    other = StreamRows(DataSource(type="jsonl", path=str(path), domain="code", streaming=True), "k", tok, 16, True, seed=4)
    assert not torch.equal(other.take(slice(0, n)).input_ids, first) and other.digest != rows.digest


def test_unpacked_rows_and_the_evaluation_head(tok, tmp_path):
    path = _jsonl(tmp_path / "d.jsonl", TEXTS)
    source = DataSource(type="jsonl", path=str(path), domain="code", streaming=True, max_examples=20)
    rows = StreamRows(source, "data.eval[0]", tok, 24, False, seed=0)
    order = _stream_order(path, 0, 0)[:20]
    ids = tok(order, add_special_tokens=False)["input_ids"]
    got = rows.take(range(20))
    for i, example in enumerate(ids):
        example = (example + [tok.eos_token_id])[:24]
        assert got.input_ids[i, : len(example)].tolist() == example
        assert int(got.attention_mask[i].sum()) == len(example)
        assert bool((got.labels[i, len(example):] == IGNORE_INDEX).all())
    head = rows.head(max_targets=50)
    counted = (head.take(slice(0, len(head))).labels[:, 1:] != IGNORE_INDEX).sum(1)
    assert int(counted.sum()) >= 50 and int(counted[:-1].sum()) < 50, "the head stops at the first row past 50 targets"
    assert torch.equal(head.take(slice(0, len(head))).input_ids, got.input_ids[: len(head)])


def test_a_stream_without_rows_or_field_is_refused(tok, tmp_path):
    blank = _jsonl(tmp_path / "blank.jsonl", ["   ", ""])
    with pytest.raises(UserError, match=r"data.train\[0\]: the stream of .* gives no row"):
        StreamRows(DataSource(type="jsonl", path=str(blank), domain="code", streaming=True), "data.train[0]", tok, 16, True, 0)
    with pytest.raises(UserError, match=r"data.train\[1\].field: .* has no column 'body'"):
        StreamRows(DataSource(type="jsonl", path=str(_jsonl(tmp_path / "d.jsonl", TEXTS)), domain="code", field="body",
                              streaming=True), "data.train[1]", tok, 16, True, 0)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "a"}\n{"text": \n')
    with pytest.raises(UserError, match=r"data.train\[0\].path: .*bad.jsonl line 2 is not valid JSON"):
        StreamRows(DataSource(type="jsonl", path=str(bad), domain="code", streaming=True), "data.train[0]", tok, 16, True, 0)


def _stream_recipe(pico, folder: Path, **train) -> Path:
    recipe = pico_recipe_dict(pico, folder / "run",
                              train={"steps": 6, "micro_batch_size": 2, "lr": 1e-3, "seed": 0, "log_every": 1, **train},
                              output={"dir": str(folder / "run"), "save_every": 1, "keep_last": 6})
    for source in recipe["data"]["train"]:
        source["streaming"] = True
    folder.mkdir(parents=True, exist_ok=True)
    return write_recipe(folder / "recipe.yaml", recipe)


def test_a_streamed_run_resumes_bitwise(pico, tmp_path):
    quiet = Console(file=io.StringIO(), width=200)
    reference = run(load_recipe(_stream_recipe(pico, tmp_path / "a")), console=quiet)
    final = load_file(str(reference / "student" / "model.safetensors"))
    # the same run, stopped after step 3: later checkpoints and the final model gone
    recipe = _stream_recipe(pico, tmp_path / "b")
    shutil.copytree(reference, tmp_path / "b" / "run")
    checkpoints = tmp_path / "b" / "run" / "checkpoints"
    for step in (4, 5, 6):
        shutil.rmtree(checkpoints / step_name(step))
    (checkpoints / LATEST).write_text(step_name(3))
    shutil.rmtree(tmp_path / "b" / "run" / "student")
    run(load_recipe(recipe), resume=True, console=quiet)
    resumed = load_file(str(tmp_path / "b" / "run" / "student" / "model.safetensors"))
    assert final.keys() == resumed.keys() and all(torch.equal(final[k], resumed[k]) for k in final)


@pytest.mark.parametrize("change, expected", [
    ({"train": {"steps": None, "epochs": 1.0}}, "data.train[0].streaming: a stream's length is unknown"),
    ({"cache": {"dir": "cache"}}, "data.train[0].streaming: the teacher cache stores rows by their index"),
])
def test_what_a_stream_cannot_do_is_refused(pico, tmp_path, monkeypatch, capsys, change, expected):
    recipe = pico_recipe_dict(pico, tmp_path / "run")
    recipe["data"]["train"][0]["streaming"] = True
    for section, values in change.items():
        recipe[section] = {**recipe.get(section, {}), **values}
    code, out = run_cli(["validate", str(write_recipe(tmp_path / "r.yaml", recipe))], monkeypatch, capsys)
    assert code == 2 and expected in " ".join(out.split()) and "Traceback" not in out


def test_a_streamed_recipe_validates(pico, tmp_path, monkeypatch, capsys):
    recipe = pico_recipe_dict(pico, tmp_path / "run")
    recipe["data"]["train"][1]["streaming"] = True  # mixed: one stored source, one streamed
    code, out = run_cli(["validate", str(write_recipe(tmp_path / "r.yaml", recipe))], monkeypatch, capsys)
    assert code == 0, out
