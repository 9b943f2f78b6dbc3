"""`merge-distill sample`: every model answers, every teacher grades; deterministic under a seed;
bad input exits 2 naming the file, line or flag."""

from __future__ import annotations

import io
import json

import pytest
import torch
from rich.console import Console
from transformers import AutoModelForCausalLM, AutoTokenizer

from conftest import pico_recipe_dict, run_cli, write_recipe
from merge_distill.engine import run
from merge_distill.recipe import load_recipe

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def run_dir(pico, tmp_path_factory):
    folder = tmp_path_factory.mktemp("sampled")
    recipe = pico_recipe_dict(pico, folder / "run", train={"steps": 2, "micro_batch_size": 2, "lr": 1e-3, "seed": 0})
    return run(load_recipe(write_recipe(folder / "r.yaml", recipe)), console=Console(file=io.StringIO()))


def prompts_file(tmp_path, text: str, name: str = "prompts.txt"):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_every_model_answers_and_every_teacher_grades_as_a_plain_forward(run_dir, pico, tmp_path, monkeypatch, capsys):
    path = prompts_file(tmp_path, "def add(a, b):\n\nThe old house\n")
    code, out = run_cli(["sample", str(run_dir), "--prompts", str(path), "--max-new-tokens", "8"], monkeypatch, capsys)
    assert code == 0 and "wrote" in out and "NLL code" in out
    rows = [json.loads(line) for line in (run_dir / "samples.jsonl").read_text().splitlines()]
    assert [(r["prompt"][0]["content"], r["model"]) for r in rows] == [
        (p, m) for p in ("def add(a, b):", "The old house") for m in ("student", "code", "prose")]
    # greedy: the student's answer is plain transformers' greedy continuation of the same input
    tokenizer = AutoTokenizer.from_pretrained(run_dir / "student")
    student = AutoModelForCausalLM.from_pretrained(run_dir / "student").eval()
    messages = [{"role": "user", "content": "def add(a, b):"}]
    assert tokenizer.chat_template  # the pico tokenizer has one: the prompt goes through it
    ids = torch.tensor([list(tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=True)["input_ids"])])
    with torch.no_grad():
        greedy = student.generate(ids, max_new_tokens=8, do_sample=False, pad_token_id=tokenizer.eos_token_id)
    assert rows[0]["answer"] == tokenizer.decode(greedy[0, ids.shape[1]:], skip_special_tokens=True)
    # the grade: the teacher's mean cross-entropy over the answer's tokens, given the prompt
    teacher = AutoModelForCausalLM.from_pretrained(pico["teacher_b"]).eval()
    answer = tokenizer(rows[0]["answer"], add_special_tokens=False)["input_ids"]
    full = torch.tensor([ids[0].tolist() + answer])
    with torch.no_grad():
        logits = teacher(full).logits[0, ids.shape[1] - 1: -1, : len(tokenizer)]
    expected = torch.nn.functional.cross_entropy(logits, full[0, ids.shape[1]:]).item()
    assert rows[0]["nll"]["prose"] == pytest.approx(expected, rel=1e-5)


def test_sampling_is_deterministic_under_a_seed(run_dir, tmp_path, monkeypatch, capsys):
    path = prompts_file(tmp_path, "The old house\n")
    answers = []
    for seed in (3, 3, 4):
        code, _ = run_cli(["sample", str(run_dir), "--prompts", str(path), "--temperature", "1.5", "--seed", str(seed),
                           "--max-new-tokens", "12", "--teacher", "code"], monkeypatch, capsys)
        assert code == 0
        answers.append([json.loads(line)["answer"] for line in (run_dir / "samples.jsonl").read_text().splitlines()])
    assert answers[0] == answers[1] and answers[0] != answers[2]


@pytest.mark.parametrize("content,name,args,message", [
    ("\n\n", "p.txt", [], "holds no prompt"),
    ('{"messages": [{"role": "user", "content": "hi"}]}\nnot json\n', "p.jsonl", [], "p.jsonl line 2: not JSON"),
    ('{"text": "hi"}\n', "p.jsonl", [], "line 1: needs a `messages` list"),
    ("hello\n", "p.txt", ["--teacher", "nobody"], "--teacher 'nobody' is not a teacher of this run"),
    ("word " * 300 + "\n", "p.txt", [], "passes its context of 256"),
])
def test_bad_input_exits_2(run_dir, tmp_path, monkeypatch, capsys, content, name, args, message):
    path = prompts_file(tmp_path, content, name)
    code, out = run_cli(["sample", str(run_dir), "--prompts", str(path), *args], monkeypatch, capsys)
    assert code == 2 and message in " ".join(out.split()) and "Traceback" not in out


def test_a_run_without_a_student_is_refused(run_dir, tmp_path, monkeypatch, capsys):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(run_dir, broken)
    shutil.rmtree(broken / "student")
    code, out = run_cli(["sample", str(broken), "--prompts", str(prompts_file(tmp_path, "hi\n"))], monkeypatch, capsys)
    assert code == 2 and "student does not exist: the run did not finish" in " ".join(out.split())


def test_the_report_shows_the_first_prompts_answers(run_dir, tmp_path, monkeypatch, capsys):
    path = prompts_file(tmp_path, "".join(f"prompt number {i}\n" for i in range(5)))
    code, _ = run_cli(["sample", str(run_dir), "--prompts", str(path), "--max-new-tokens", "4"], monkeypatch, capsys)
    assert code == 0
    report = json.loads((run_dir / "report.json").read_text())  # rewritten by `sample`
    assert [(s["prompt"], s["model"]) for s in report["samples"]] == [
        (f"prompt number {i}", m) for i in range(3) for m in ("student", "code", "prose")]
    code, out = run_cli(["report", str(run_dir), "--no-color", "--width", "160"], monkeypatch, capsys)
    assert code == 0 and "Samples" in out and "prompt number 2" in out and "prompt number 3" not in out
