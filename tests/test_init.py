"""`merge-distill init`: a recipe from --teacher/--student/--data that passes `validate` and runs."""

from __future__ import annotations

import json

import pytest
import yaml

from conftest import run_cli
from merge_distill.engine import run
from merge_distill.recipe import load_recipe

pytestmark = pytest.mark.usefixtures("one_thread")


def test_init_validate_run_on_two_teachers(pico, tmp_path, monkeypatch, capsys) -> None:
    out = tmp_path / "recipes" / "mine.yaml"
    code, printed = run_cli(["init", str(out), "--teacher", f"code={pico['teacher_a']}", "--teacher",
                             f"prose={pico['teacher_b']}", "--student", "from_teacher",
                             "--data", f"{pico['code']}:code", "--data", f"{pico['prose']}:prose"], monkeypatch, capsys)
    assert code == 0 and "wrote" in printed
    text = out.read_text()
    assert text.startswith("# Written by `merge-distill init`") and "kind: ce" in text  # two teachers: per-token ce
    recipe = yaml.safe_load(text)
    assert recipe["student"] == {"from_teacher": {"teacher": "code", "layers": [0]}}  # half of the pico's 2 layers
    assert recipe["data"]["seq_len"] == 256  # the pico models' context window, below the default 512
    assert [s["domain"] for s in recipe["data"]["train"]] == ["code", "prose"]
    assert not recipe["teachers"][0]["model"].startswith("/")  # paths relative to the recipe
    code, printed = run_cli(["validate", str(out)], monkeypatch, capsys)
    assert code == 0 and printed.startswith("ok:"), printed
    loaded = load_recipe(out, ["train.steps=2", "data.seq_len=32", f"output.dir={tmp_path / 'run'}"])
    run_dir = run(loaded)
    assert len((run_dir / "metrics.jsonl").read_text().splitlines()) == 2


def test_one_teacher_random_student_and_chat_data(pico, tmp_path, monkeypatch, capsys) -> None:
    out = tmp_path / "chat.yaml"
    code, _ = run_cli(["init", str(out), "--teacher", f"big={pico['teacher_a']}", "--student", "from_config",
                       "--data", str(pico["chat"])], monkeypatch, capsys)
    recipe = yaml.safe_load(out.read_text())
    assert code == 0 and recipe["routing"]["kind"] == "uniform"  # one teacher: classic distillation
    assert recipe["student"]["from_config"] == {"base": "big", "overrides": {"num_hidden_layers": 1}}
    assert recipe["train"]["lr"] == 1e-3  # a random init
    (source,) = recipe["data"]["train"]
    assert source["field"] == "messages" and source["format"] == "chat" and source["domain"] == "chat"
    code, printed = run_cli(["validate", str(out)], monkeypatch, capsys)
    assert code == 0, printed


@pytest.mark.parametrize("args,message", [
    (["--teacher", "nameonly"], "give NAME=PATH"),
    (["--teacher", "x=/no/such/model"], "--teacher x '/no/such/model': cannot read its config.json"),
    (["--teacher", "a=TEACHER", "--teacher", "a=TEACHER"], "--teacher names must differ"),
    (["--teacher", "a=TEACHER", "--data", "DATA_BAD"], "line 1 is not JSON"),
])
def test_bad_input_exits_2_naming_the_flag(pico, tmp_path, monkeypatch, capsys, args, message) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text("not json\n")
    args = [a.replace("TEACHER", str(pico["teacher_a"])).replace("DATA_BAD", str(bad)) for a in args]
    if "--data" not in args:
        args += ["--data", str(pico["code"])]
    out = tmp_path / "r.yaml"
    code, printed = run_cli(["init", str(out), *args], monkeypatch, capsys)
    assert code == 2 and message in " ".join(printed.split()) and "Traceback" not in printed
    assert not out.exists()


def test_an_existing_file_is_kept_without_force(pico, tmp_path, monkeypatch, capsys) -> None:
    out = tmp_path / "r.yaml"
    out.write_text("mine\n")
    args = ["init", str(out), "--teacher", f"a={pico['teacher_a']}", "--data", str(pico["code"])]
    code, printed = run_cli(args, monkeypatch, capsys)
    assert code == 2 and "pass --force" in printed and out.read_text() == "mine\n"
    code, _ = run_cli([*args, "--force"], monkeypatch, capsys)
    assert code == 0 and json.dumps(yaml.safe_load(out.read_text())["teachers"])
