"""`merge-distill chat`, driven through its standard input on a pico run."""

from __future__ import annotations

import io
import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from conftest import run_cli
from test_sample import run_dir  # noqa: F401  the module-scoped pico run

pytestmark = pytest.mark.usefixtures("one_thread")


def chat(run_dir, lines: str, args: list[str], monkeypatch, capsys) -> tuple[int, str]:  # noqa: F811
    monkeypatch.setattr("sys.stdin", io.StringIO(lines))
    return run_cli(["chat", str(run_dir), "--max-new-tokens", "8", *args], monkeypatch, capsys)


def test_greedy_answers_equal_plain_generate_with_the_template(run_dir, monkeypatch, capsys) -> None:  # noqa: F811
    code, out = chat(run_dir, "def add(a, b):\n/exit\n", [], monkeypatch, capsys)
    assert code == 0 and "student> " in out
    tokenizer = AutoTokenizer.from_pretrained(run_dir / "student")
    model = AutoModelForCausalLM.from_pretrained(run_dir / "student").eval()
    messages = [{"role": "user", "content": "def add(a, b):"}]
    ids = torch.tensor([list(tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=True)["input_ids"])])
    with torch.no_grad():
        greedy = model.generate(ids, max_new_tokens=8, do_sample=False, pad_token_id=tokenizer.eos_token_id)
    expected = tokenizer.decode(greedy[0, ids.shape[1]:], skip_special_tokens=True)
    streamed = out.split("student> ", 1)[1].split("you> ", 1)[0]
    assert streamed.rstrip("\n") == expected.rstrip("\n")


def test_compare_answers_with_every_model_and_save_and_reset(run_dir, tmp_path, monkeypatch, capsys) -> None:  # noqa: F811
    saved = tmp_path / "chat.json"
    code, out = chat(run_dir, f"hello there\n/save {saved}\n/reset\n/save {tmp_path / 'empty.json'}\n/exit\n",
                     ["--compare"], monkeypatch, capsys)
    assert code == 0
    for name in ("student", "code", "prose"):  # one answer per model
        assert f" {name} " in out
    assert out.count("╭") == 3
    transcript = json.loads(saved.read_text())
    assert set(transcript) == {"student", "code", "prose"}
    assert all([m["role"] for m in turns] == ["user", "assistant"] for turns in transcript.values())
    assert json.loads((tmp_path / "empty.json").read_text()) == {"student": [], "code": [], "prose": []}


def test_chat_with_a_teacher_and_an_unknown_one(run_dir, monkeypatch, capsys) -> None:  # noqa: F811
    code, out = chat(run_dir, "hi\n", ["--teacher", "prose"], monkeypatch, capsys)
    assert code == 0 and "chatting with prose" in out and "prose> " in out
    code, out = chat(run_dir, "hi\n", ["--teacher", "nobody"], monkeypatch, capsys)
    assert code == 2 and "--teacher 'nobody' is not a teacher of this run" in " ".join(out.split())
