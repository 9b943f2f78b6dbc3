"""Bad recipes: every problem reported at once, naming the key, exit code 2, no traceback."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import pico_recipe_dict, run_cli, write_recipe
from merge_distill.errors import UserError
from merge_distill.recipe import load_recipe


def mutate(recipe: dict, key: str, value) -> dict:
    node = recipe
    parts = key.split(".")
    for part in parts[:-1]:
        node = node[int(part)] if isinstance(node, list) else node[part]
    if value is DELETE:
        del node[parts[-1]]
    elif isinstance(node, list):
        node[int(parts[-1])] = value
    else:
        node[parts[-1]] = value
    return recipe


DELETE = object()

# (case id, [(key, value)], expected fragments of the message)
BAD_CASES = [
    ("unknown-top-key", [("trian", {"steps": 1})], ["trian: unknown key", "did you mean 'train'"]),
    ("unknown-train-key", [("train.step", 3)], ["train.step: unknown key", "did you mean 'steps'"]),
    ("wrong-type", [("train.lr", "fast")], ["train.lr:", "'fast'"]),
    ("missing-student", [("student", DELETE)], ["student: required but missing"]),
    ("two-student-inits", [("student.from_config", {"base": "code"})], ["student", "exactly one of"]),
    ("steps-and-epochs", [("train.epochs", 1)], ["train.steps or train.epochs, not both"]),
    ("fixed-weights-count", [("routing", {"kind": "fixed", "weights": {"code": 1.0}})],
     ["routing.weights has 1 entries but 2 teachers are listed (code, prose)"]),
    ("unknown-router", [("routing", {"kind": "oracle"})], ["routing.kind: 'oracle' is not a known router", "uniform"]),
    ("unknown-loss", [("loss", {"kind": "kl"})], ["loss.kind: 'kl' is not a known loss", "forward_kl"]),
    ("negative-temperature", [("loss", {"kind": "forward_kl", "temperature": -1})], ["loss.temperature", "greater than 0"]),
    ("jsd-beta-range", [("loss", {"kind": "jsd", "beta": 1.5})], ["loss.beta"]),
    ("duplicate-teacher", [("teachers.1.name", "code")], ["teachers[1].name: 'code' is already used by teachers[0]"]),
    ("missing-model", [("teachers.0.model", "./no/such/model")], ["teachers[0].model:", "does not exist"]),
    ("missing-data", [("data.train.0.path", "./nothing.jsonl")], ["data.train[0].path:", "matches no file"]),
    ("domain-missing", [("routing", {"kind": "domain", "weights": {"code": {"code": 1.0}}})],
     ["routing", "prose"]),
    ("seq-len-too-long", [("data.seq_len", 4096)], ["data.seq_len: 4096 is beyond the 256-token context"]),
    ("bad-teacher-name", [("teachers.0.name", "a b")], ["teachers[0].name"]),
    ("zero-weight-source", [("data.train.0.weight", 0)], ["data.train[0].weight", "greater than 0"]),
]


@pytest.mark.parametrize("case,changes,fragments", BAD_CASES, ids=[c[0] for c in BAD_CASES])
def test_bad_recipe_exits_2_with_key_path(case, changes, fragments, pico, tmp_path, monkeypatch, capsys):
    recipe = pico_recipe_dict(pico, tmp_path / "run")
    for key, value in changes:
        mutate(recipe, key, value)
    path = write_recipe(tmp_path / f"{case}.yaml", recipe)
    code, text = run_cli(["validate", str(path)], monkeypatch, capsys)
    assert code == 2, text
    assert "Traceback" not in text
    for fragment in fragments:
        assert fragment in text, f"{fragment!r} not in:\n{text}"


def test_every_problem_reported_at_once(pico, tmp_path):
    recipe = pico_recipe_dict(pico, tmp_path / "run")
    recipe["train"]["lr"] = "fast"
    recipe["train"]["bogus"] = 1
    recipe["loss"] = {"kind": "forward_kl", "temperature": 0}
    with pytest.raises(UserError) as exc:
        load_recipe(write_recipe(tmp_path / "r.yaml", recipe))
    assert len(exc.value.problems) == 3, exc.value.problems


def test_malformed_yaml_names_line(tmp_path, monkeypatch, capsys):
    path = tmp_path / "broken.yaml"
    path.write_text("teachers:\n  - name: a\n    model: [unclosed\nstudent: {}\n")
    code, text = run_cli(["validate", str(path)], monkeypatch, capsys)
    assert code == 2 and "not valid YAML at line" in text and str(path) in text


def test_missing_recipe_file(tmp_path, monkeypatch, capsys):
    code, text = run_cli(["validate", str(tmp_path / "nope.yaml")], monkeypatch, capsys)
    assert code == 2 and "recipe file not found" in text


def test_bad_override(make_recipe, monkeypatch, capsys):
    code, text = run_cli(["validate", str(make_recipe()), "train.steps"], monkeypatch, capsys)
    assert code == 2 and "is not KEY=VALUE" in text


def test_a_teacher_with_another_tokenizer_is_aligned(pico, tmp_path, monkeypatch, capsys):
    from merge_distill.pico import build_bpe_tokenizer

    other = tmp_path / "other_teacher"
    shutil.copytree(pico["teacher_b"], other)
    build_bpe_tokenizer(["completely different words " * 50, "zebra quartz " * 40], 300, other)
    recipe = pico_recipe_dict(pico, tmp_path / "run")
    recipe["teachers"][1]["model"] = str(other)
    code, text = run_cli(["validate", str(write_recipe(tmp_path / "r.yaml", recipe))], monkeypatch, capsys)
    assert code == 0, text
    text = " ".join(text.split())
    assert "aligned source" in text
    assert "teacher 'prose' uses another tokenizer (byte-level BPE, " in text and "tokens): aligned through byte offsets" in text
    assert "teacher 'code'" not in text.split("aligned source", 1)[1]  # the same tokenizer: no alignment line


def test_existing_run_dir_refused(make_recipe, tmp_path, monkeypatch, capsys):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "run.json").write_text("{}")
    (run_dir / "metrics.jsonl").write_text('{"step": 1}\n')
    code, text = run_cli(["run", str(make_recipe())], monkeypatch, capsys)
    assert code == 2 and "already holds a run" in text and "--overwrite" in text
    assert (run_dir / "metrics.jsonl").read_text() == '{"step": 1}\n', "nothing written may be lost"


def test_real_process_exit_code_and_no_traceback(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("teachers: 3\n")
    proc = subprocess.run([sys.executable, "-m", "merge_distill.cli", "validate", str(bad)],
                          capture_output=True, text=True)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert "teachers:" in proc.stderr


def test_overrides_and_relative_paths(pico, tmp_path):
    folder = tmp_path / "recipes"
    folder.mkdir()
    shutil.copy(pico["code"], folder / "code.jsonl")
    recipe = pico_recipe_dict(pico, Path("out/run"))
    recipe["data"]["train"] = [{"type": "jsonl", "path": "code.jsonl", "domain": "code"}]
    loaded = load_recipe(write_recipe(folder / "r.yaml", recipe), ["train.steps=7", "loss.temperature=2", "teachers.0.name=c"])
    assert loaded.train.steps == 7 and loaded.loss.temperature == 2.0 and loaded.teachers[0].name == "c"
    assert loaded.data.train[0].path == str((folder / "code.jsonl").resolve())
    assert loaded.output.dir == str((folder / "out/run").resolve())
    assert "code.jsonl" in loaded.to_yaml()
