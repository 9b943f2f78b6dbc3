"""`merge-distill schema` (the recipe's JSON Schema, for editors) and shell completion."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest
import yaml

from conftest import run_cli

ROOT = Path(__file__).resolve().parents[1]
CLI = [sys.executable, "-c", "from merge_distill.cli import main; main()"]


@pytest.fixture(scope="module")
def validator() -> jsonschema.Draft202012Validator:
    out = subprocess.run([*CLI, "schema"], capture_output=True, text=True, check=True, cwd=ROOT)
    schema = json.loads(out.stdout)
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema)


@pytest.mark.parametrize("recipe", sorted((ROOT / "recipes").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_recipe_is_valid_under_the_schema(validator, recipe: Path) -> None:
    errors = list(validator.iter_errors(yaml.safe_load(recipe.read_text())))
    assert not errors, [e.message for e in errors]


@pytest.mark.parametrize("change,path,words", [
    (lambda r: r["train"].update(stepz=3), ["train"], "stepz"),                  # a misspelt key
    (lambda r: r["loss"].update(kind="kl"), ["loss"], "kl"),                     # an unknown divergence
    (lambda r: r["train"].update(lr="fast"), ["train", "lr"], "fast"),           # a wrong type
    (lambda r: r.pop("teachers"), [], "teachers"),                               # a required section missing
])
def test_the_schema_names_the_key_an_editor_should_flag(validator, change, path, words) -> None:
    recipe = yaml.safe_load((ROOT / "recipes" / "quickstart.yaml").read_text())
    change(recipe)
    errors = list(validator.iter_errors(recipe))
    assert errors and any(list(e.absolute_path)[: len(path)] == path and words in e.message for e in errors), \
        [(list(e.absolute_path), e.message) for e in errors]


def test_schema_keeps_the_field_descriptions_and_writes_a_file(tmp_path, monkeypatch, capsys) -> None:
    code, _ = run_cli(["schema", "--out", str(tmp_path / "recipe.schema.json")], monkeypatch, capsys)
    schema = json.loads((tmp_path / "recipe.schema.json").read_text())
    assert code == 0 and schema["title"] == "merge_distill recipe"
    teacher = schema["$defs"]["TeacherSpec"]["properties"]
    assert "self" in teacher["model"]["description"] and teacher["name"]["description"]


def test_shell_completion_completes_commands_and_options() -> None:
    def complete(words: str, cword: int) -> list[str]:
        env = {**os.environ, "_MERGE_DISTILL_COMPLETE": "complete_bash", "COMP_WORDS": words, "COMP_CWORD": str(cword)}
        return subprocess.run([str(Path(sys.executable).parent / "merge-distill")],
                              capture_output=True, text=True, env=env, check=True).stdout.split()
    assert complete("merge-distill ru", 1) == ["run"]
    assert "--overwrite" in complete("merge-distill run --ov", 2)
    # typer otherwise detects the shell from the parent processes, which a detached test run may lack;
    # with detection off, --show-completion takes the shell's name
    no_detection = {**os.environ, "_TYPER_COMPLETE_TEST_DISABLE_SHELL_DETECTION": "1"}
    shown = subprocess.run([str(Path(sys.executable).parent / "merge-distill"), "--show-completion", "bash"],
                           capture_output=True, text=True, env=no_detection)
    assert shown.returncode == 0, (shown.stdout, shown.stderr)
    assert "_MERGE_DISTILL_COMPLETE" in shown.stdout
