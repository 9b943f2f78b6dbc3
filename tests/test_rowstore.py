"""The tokenized-rows store: rows equal a plain reference, are stored as uint32 and built once,
rebuilt when data, tokenizer or seq_len change, never read half written, built by one of
several processes, and the same with tokenizer workers as without."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer

from merge_distill import rowstore
from merge_distill.errors import UserError
from merge_distill.rowstore import META_FILE, build_rows
from merge_distill.schema import DataSource
from merge_distill.signals import IGNORE_INDEX

TEXTS = ["def f(x):\n    return x + 1\n" * 3, "The river runs past the mill. " * 4, "   ", "a = [1, 2, 3]\n" * 9]


def _jsonl(path: Path, texts: list[str]) -> Path:
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return path


def _reference(tok, texts: list[str], seq_len: int, packing: bool) -> torch.Tensor:
    """The rows as the old in-RAM code made them: EOS after each non-blank text; packed and cut,
    or one padded row per example."""
    examples = [ids + [tok.eos_token_id] for ids in tok([t for t in texts if t.strip()], add_special_tokens=False)["input_ids"]]
    if packing:
        flat = [t for e in examples for t in e]
        return torch.tensor(flat[: len(flat) // seq_len * seq_len]).view(-1, seq_len)
    return torch.tensor([(e + [tok.pad_token_id] * seq_len)[:seq_len] for e in examples])


@pytest.mark.parametrize("packing", [True, False])
def test_rows_equal_the_reference_and_are_stored_as_uint32(pico, tmp_path, packing):
    tok = AutoTokenizer.from_pretrained(pico["tokenizer"])
    source = DataSource(type="jsonl", path=str(_jsonl(tmp_path / "d.jsonl", TEXTS)), domain="code")
    rows = build_rows(source, "data.train[0]", tok, 16, packing, tmp_path / "store")
    expected = _reference(tok, TEXTS, 16, packing)
    got = rows.take(slice(0, len(rows)))
    assert torch.equal(got.input_ids, expected)
    real = got.attention_mask.bool()
    assert torch.equal(got.labels[real], expected[real]) and bool((got.labels[~real] == IGNORE_INDEX).all())
    assert rows.table.features["input_ids"].feature.dtype == "uint32"
    assert rows.targets().tolist() == (got.labels[:, 1:] != IGNORE_INDEX).sum(1).tolist()
    picked = rows.take([2, 0, 2])
    assert torch.equal(picked.input_ids, expected[[2, 0, 2]])


def test_built_once_then_mapped_and_rebuilt_when_inputs_change(pico, tmp_path, monkeypatch):
    tok = AutoTokenizer.from_pretrained(pico["tokenizer"])
    data = _jsonl(tmp_path / "d.jsonl", TEXTS)
    source = DataSource(type="jsonl", path=str(data), domain="code")
    store = tmp_path / "store"
    first = build_rows(source, "data.train[0]", tok, 16, True, store)
    builds: list[str] = []
    real_build = rowstore._build
    monkeypatch.setattr(rowstore, "_build", lambda *a, **k: (builds.append(a[6]), real_build(*a, **k)))
    again = build_rows(source, "data.train[0]", tok, 16, True, store)
    assert builds == [] and again.digest == first.digest
    build_rows(source, "data.train[0]", tok, 24, True, store)  # seq_len
    _jsonl(data, [*TEXTS, "one more line"])
    changed = build_rows(source, "data.train[0]", tok, 16, True, store)  # contents
    assert len(builds) == 2 and changed.digest != first.digest
    sp = AutoTokenizer.from_pretrained(pico["tokenizer"])
    sp.add_tokens(["<extra>"])
    build_rows(source, "data.train[0]", sp, 16, True, store)  # tokenizer
    assert len(builds) == 3 and len(set(builds)) == 3
    assert sorted(p.name for p in store.iterdir() if p.is_dir()) == sorted(builds + [first.table.cache_files[0]["filename"].split("/")[-2]])


def test_a_build_that_fails_leaves_nothing_that_looks_complete(pico, tmp_path, monkeypatch):
    tok = AutoTokenizer.from_pretrained(pico["tokenizer"])
    source = DataSource(type="jsonl", path=str(_jsonl(tmp_path / "d.jsonl", TEXTS * 50)), domain="code")
    store = tmp_path / "store"
    monkeypatch.setattr(rowstore, "MAP_BATCH", 8)
    calls = []

    def fail_on_second(self, table, *args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise OSError("disk full")
        return real_write(self, table, *args, **kwargs)

    real_write = rowstore.ArrowWriter.write_table
    monkeypatch.setattr(rowstore.ArrowWriter, "write_table", fail_on_second)
    with pytest.raises(OSError, match="disk full"):
        build_rows(source, "data.train[0]", tok, 16, True, store)
    assert [p.name for p in store.iterdir() if p.is_dir()] == []
    monkeypatch.setattr(rowstore.ArrowWriter, "write_table", real_write)
    rows = build_rows(source, "data.train[0]", tok, 16, True, store)
    assert torch.equal(rows.take(slice(0, len(rows))).input_ids, _reference(tok, TEXTS * 50, 16, True))


_BUILDER = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from transformers import AutoTokenizer
    from merge_distill import rowstore
    from merge_distill.schema import DataSource
    tok_dir, data, store, mode = sys.argv[1:5]
    real_pack = rowstore.pack
    def slow_pack(*args, **kwargs):
        for i, block in enumerate(real_pack(*args, **kwargs)):
            if mode == "hang" and i == 1:
                print("packing", flush=True)
                time.sleep(600)
            yield block
    rowstore.MAP_BATCH = 8
    rowstore.pack = slow_pack
    real_build = rowstore._build
    def build(*args, **kwargs):
        print("built", flush=True)
        time.sleep(2 if mode == "race" else 0)
        return real_build(*args, **kwargs)
    rowstore._build = build
    rows = rowstore.build_rows(DataSource(type="jsonl", path=data, domain="code"), "data.train[0]",
                               AutoTokenizer.from_pretrained(tok_dir), 16, True, Path(store))
    print("digest", rows.digest, flush=True)
""")


def _builder(pico, data: Path, store: Path, mode: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", _BUILDER, str(pico["tokenizer"]), str(data), str(store), mode],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_sigkill_mid_build_then_a_clean_build(pico, tmp_path):
    tok = AutoTokenizer.from_pretrained(pico["tokenizer"])
    data = _jsonl(tmp_path / "d.jsonl", TEXTS * 50)
    store = tmp_path / "store"
    proc = _builder(pico, data, store, "hang")
    assert proc.stdout.readline().strip() == "built"
    assert proc.stdout.readline().strip() == "packing"
    partial = [p for p in store.iterdir() if ".partial-" in p.name]
    assert len(partial) == 1 and (partial[0] / rowstore.ROWS_FILE).exists()
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert not any((p / META_FILE).exists() for p in store.iterdir() if p.is_dir())
    rows = build_rows(DataSource(type="jsonl", path=str(data), domain="code"), "data.train[0]", tok, 16, True, store)
    assert torch.equal(rows.take(slice(0, len(rows))).input_ids, _reference(tok, TEXTS * 50, 16, True))
    assert [p.name for p in store.iterdir() if p.is_dir()] == [Path(rows.table.cache_files[0]["filename"]).parent.name]


def test_two_processes_one_builds_the_other_waits_and_maps_the_same_rows(pico, tmp_path):
    data = _jsonl(tmp_path / "d.jsonl", TEXTS * 20)
    store = tmp_path / "store"
    procs = [_builder(pico, data, store, "race") for _ in range(2)]
    outs = [p.communicate(timeout=120)[0].split("\n") for p in procs]
    assert all(p.returncode == 0 for p in procs), [p.stderr for p in procs]
    assert sum(line == "built" for out in outs for line in out) == 1
    digests = {line for out in outs for line in out if line.startswith("digest")}
    assert len(digests) == 1


def test_tokenizer_workers_give_the_same_rows(pico, tmp_path):
    tok = AutoTokenizer.from_pretrained(pico["tokenizer"])
    source = DataSource(type="jsonl", path=str(_jsonl(tmp_path / "d.jsonl", TEXTS * 30)), domain="code")
    one = build_rows(source, "data.train[0]", tok, 16, False, tmp_path / "a", num_proc=1)
    two = build_rows(source, "data.train[0]", tok, 16, False, tmp_path / "b", num_proc=2)
    assert one.digest == two.digest and len(one) == len(TEXTS * 30) - 30


def test_bad_example_in_a_worker_names_it(pico, tmp_path):
    tok = AutoTokenizer.from_pretrained(pico["tokenizer"])
    lines = [json.dumps({"text": "fine"})] * 40 + [json.dumps({"text": 7})]
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(lines) + "\n")
    source = DataSource(type="jsonl", path=str(path), domain="code")
    with pytest.raises(UserError, match=r"data.train\[0\].field: example 41 of .* holds int"):
        build_rows(source, "data.train[0]", tok, 16, True, tmp_path / "store", num_proc=2)
    assert not any((tmp_path / "store").glob("*/meta.json"))
