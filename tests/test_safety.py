"""Safety: a recipe can never run code, remote code is opt-in per model and named, weights are
safetensors, every torch.load is weights_only, and relative paths resolve against the recipe."""

from __future__ import annotations

import io
import re
import shutil
import warnings
from pathlib import Path

import pytest
import yaml
from rich.console import Console

from conftest import pico_recipe_dict, run_cli, write_recipe
from merge_distill import models
from merge_distill.engine import run
from merge_distill.recipe import load_recipe
from merge_distill.schema import TeacherSpec

PACKAGE = Path(__file__).parents[1] / "merge_distill"


def call_args(text: str, start: int) -> str:
    """The text between the parentheses of the call whose '(' is at text[start]."""
    depth = 0
    for i in range(start, len(text)):
        depth += {"(": 1, ")": -1}.get(text[i], 0)
        if depth == 0:
            return text[start + 1 : i]
    raise AssertionError("unbalanced parentheses")


def test_python_object_tag_is_refused_and_never_runs(tmp_path, monkeypatch, capsys):
    marker = tmp_path / "ran"
    recipe = tmp_path / "evil.yaml"
    recipe.write_text(f'name: !!python/object/apply:os.system ["touch {marker}"]\nteachers: []\n')
    code, text = run_cli(["validate", str(recipe)], monkeypatch, capsys)
    assert code == 2 and "Traceback" not in text
    assert f"{recipe}: the YAML tag at line 1 is not allowed" in text and "can never run code" in text
    assert not marker.exists()


def test_override_values_are_plain_data(make_recipe):
    recipe = load_recipe(make_recipe(), ["name=!!python/object/apply:os.getcwd []"])
    assert recipe.name == "!!python/object/apply:os.getcwd []", "kept as text, never constructed"


def test_no_unsafe_loading_in_the_package():
    """Every torch.load passes weights_only=True; no pickle, unsafe YAML, eval/exec or import-by-string."""
    for path in sorted(PACKAGE.rglob("*.py")):
        text = path.read_text(encoding="utf-8")
        for match in re.finditer(r"\btorch\.load\(", text):
            args = call_args(text, match.end() - 1)
            assert re.search(r"weights_only\s*=\s*True", args), f"{path}: torch.load({args}) without weights_only=True"
        for pattern in (r"\bpickle\.loads?\(", r"\byaml\.(load|unsafe_load|full_load)\(", r"yaml\.(Unsafe|Full)?Loader\b",
                        r"(?<![\w.])(eval|exec)\(", r"\bimportlib\b", r"__import__\("):
            assert not re.search(pattern, text), f"{path} matches {pattern}"


def test_trust_remote_code_is_off_unless_set_and_named_when_on(pico, monkeypatch):
    seen: list[bool] = []
    real = models.AutoModelForCausalLM.from_pretrained

    def spy(*args, **kwargs):
        seen.append(kwargs["trust_remote_code"])
        return real(*args, **kwargs)

    monkeypatch.setattr(models.AutoModelForCausalLM, "from_pretrained", spy)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        models.load_teacher(TeacherSpec(name="code", model=str(pico["teacher_a"])), "fp32")
    assert seen == [False] and not [w for w in caught if "own Python code" in str(w.message)]
    with pytest.warns(UserWarning, match=r"teachers\[code\] \(.*teacher_a\) runs its own Python code .*trust_remote_code: true"):
        models.load_teacher(TeacherSpec(name="code", model=str(pico["teacher_a"]), trust_remote_code=True), "fp32")
    assert seen == [False, True]
    assert TeacherSpec(name="x", model="m").trust_remote_code is False


def test_relative_paths_resolve_against_the_recipe_folder(pico, tmp_path, monkeypatch):
    folder = tmp_path / "project"
    (folder / "data").mkdir(parents=True)
    shutil.copy(pico["code"], folder / "data" / "code.jsonl")
    shutil.copytree(pico["teacher_a"], folder / "models" / "a")
    recipe = pico_recipe_dict(pico, Path("runs/one"))
    recipe["teachers"][0]["model"] = "models/a"
    recipe["data"]["train"] = [{"type": "jsonl", "path": "data/code.jsonl", "domain": "code"}]
    recipe["train"]["steps"] = 1
    path = write_recipe(folder / "recipe.yaml", recipe)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    run_dir = run(load_recipe(path), console=Console(file=io.StringIO()))
    assert run_dir == (folder / "runs" / "one").resolve()
    saved = yaml.safe_load((run_dir / "recipe.yaml").read_text())
    assert saved["teachers"][0]["model"] == str((folder / "models" / "a").resolve())
    assert saved["data"]["train"][0]["path"] == str((folder / "data" / "code.jsonl").resolve())
    assert saved["output"]["dir"] == str(run_dir)
    assert not any(elsewhere.iterdir()), "nothing is written relative to the working directory"


def test_weights_are_safetensors(make_recipe):
    run_dir = run(load_recipe(make_recipe(train={"steps": 1, "micro_batch_size": 2}, output={"dir": "run"})),
                  console=Console(file=io.StringIO()))
    student = {p.name for p in (run_dir / "student").iterdir()}
    assert "model.safetensors" in student and not {n for n in student if n.endswith((".bin", ".pt", ".pth"))}
    checkpoint = run_dir / "checkpoints" / "step-000001"
    assert (checkpoint / "model.safetensors").is_file() and not (checkpoint / "pytorch_model.bin").exists()
