"""Bad input beyond the recipe schema (see test_recipe_errors.py for that): data files, models,
tokenizers, the output location, a full disk, overrides. Each exits with code 2 and one line that
names the file or recipe key, what is wrong and how to fix it; no traceback; and nothing
half-written is left looking complete."""

from __future__ import annotations

import errno
import json
import shutil
from pathlib import Path

import pytest
from accelerate import Accelerator

from conftest import pico_recipe_dict, run_cli, write_recipe
from merge_distill import rundir


def assert_nothing_looks_complete(run_dir: Path) -> None:
    if not run_dir.exists():
        return
    assert not (run_dir / "student").exists(), "no student folder from a failed run"
    assert not (run_dir / "checkpoints" / "latest").exists(), "no checkpoint pointer"
    assert not list(run_dir.rglob(".tmp-*")) and not list(run_dir.rglob("*.tmp")), "no temporary leftovers"
    if (run_dir / "run.json").exists():
        assert json.loads((run_dir / "run.json").read_text())["status"] != "complete"


def expect_exit_2(args: list[str], fragments: list[str], monkeypatch, capsys, run_dir: Path | None = None,
                  validate_sees: bool = True) -> str:
    """`args` exits with code 2 and prints every fragment. For a `run` that fails before its first
    step (validate_sees), `validate` with the same arguments must fail first, with the same words:
    a recipe that validates never fails at start for a reason validate could have seen."""
    if args[0] == "run" and validate_sees:
        code, text = run_cli(["validate", *args[1:]], monkeypatch, capsys)
        assert code == 2, f"validate passed a recipe that run refuses:\n{text}"
        for fragment in fragments:
            assert fragment in text, f"validate: {fragment!r} not in:\n{text}"
    code, text = run_cli(args, monkeypatch, capsys)
    assert code == 2, text
    assert "Traceback" not in text
    for fragment in fragments:
        assert fragment in text, f"{fragment!r} not in:\n{text}"
    if run_dir is not None:
        assert_nothing_looks_complete(run_dir)
    return text


# -- data files ------------------------------------------------------------------------------

# (case, file name, content, source fields, expected fragments; FILE stands for the file's path)
DATA_CASES = [
    ("empty-file", "empty.jsonl", "", {}, ["data.train[0].path: FILE is empty", "one JSON object per line"]),
    ("blank-lines-only", "blank.jsonl", "\n  \n\n", {}, ["data.train[0].path: FILE is empty"]),
    ("no-text-field", "body.jsonl", '{"body": "hello"}\n', {}, ["data.train[0].field: FILE has no column 'text'",
                                                                "its columns are: body"]),
    ("line-not-json", "broken.jsonl", '{"text": "fine"}\n{"text": "unterminated\n{"text": "x"}\n', {},
     ["data.train[0].path: FILE line 2 is not valid JSON", "each line of a jsonl file must be one JSON object"]),
    ("line-not-object", "lists.jsonl", "[1, 2]\n[3]\n", {}, ["FILE line 1 is a JSON list, not an object"]),
    ("text-not-string", "numbers.jsonl", '{"text": 1}\n{"text": 2}\n', {},
     ["data.train[0].field: example 1 of FILE holds int in 'text', not text"]),
    ("only-empty-text", "spaces.jsonl", '{"text": "  "}\n{"text": ""}\n', {},
     ["data.train[0].path: FILE holds only empty text"]),
    ("not-parquet", "table.parquet", "garbage", {"type": "parquet"},
     ["data.train[0].path: cannot read FILE as parquet", "check that the file is valid parquet"]),
    ("chat-without-assistant", "chat.jsonl", json.dumps({"messages": [{"role": "user", "content": "hi"}]}) + "\n",
     {"field": "messages"}, ["data.train[0]: no example of FILE has an assistant turn", "set format: text"]),
    ("chat-message-without-role", "chat.jsonl", json.dumps({"messages": [{"content": "hi"}]}) + "\n",
     {"field": "messages"}, ["data.train[0].field: example 1 of FILE, message 1 has no text 'role'",
                             '{"role": "user", "content": "..."}']),
]


@pytest.mark.parametrize("case,name,content,fields,fragments", DATA_CASES, ids=[c[0] for c in DATA_CASES])
def test_bad_data_file(case, name, content, fields, fragments, pico, tmp_path, monkeypatch, capsys):
    data = tmp_path / name
    data.write_text(content)
    source = {"type": "jsonl", "path": str(data), "domain": "code", **fields}
    recipe = pico_recipe_dict(pico, tmp_path / "run")
    recipe["data"]["train"] = [source]
    path = write_recipe(tmp_path / "r.yaml", recipe)
    expect_exit_2(["run", str(path)], [f.replace("FILE", str(data)) for f in fragments], monkeypatch, capsys,
                  tmp_path / "run")


def test_data_folder_without_files(pico, tmp_path, monkeypatch, capsys):
    (tmp_path / "nothing").mkdir()
    recipe = pico_recipe_dict(pico, tmp_path / "run")
    recipe["data"]["train"][0]["path"] = str(tmp_path / "nothing")
    expect_exit_2(["validate", str(write_recipe(tmp_path / "r.yaml", recipe))],
                  [f"data.train[0].path: {tmp_path / 'nothing'} matches no file"], monkeypatch, capsys)


# -- routing weights, models, tokenizers -----------------------------------------------------


@pytest.mark.parametrize("weights,fragment", [
    ({"code": 0, "prose": 0}, "routing.weights are all 0; give at least one teacher a positive weight"),
    ({"code": -1, "prose": 1}, "routing.weights.code is -1.0; weights must be >= 0"),
], ids=["all-zero", "negative"])
def test_bad_fixed_weights(weights, fragment, make_recipe, monkeypatch, capsys):
    path = make_recipe(routing={"kind": "fixed", "weights": weights})
    expect_exit_2(["run", str(path)], [fragment], monkeypatch, capsys, path.parent / "run")


def teacher_copy(pico, tmp_path: Path, name: str) -> Path:
    folder = tmp_path / name
    shutil.copytree(pico["teacher_b"], folder)
    return folder


def with_teacher(pico, tmp_path: Path, folder: Path) -> Path:
    recipe = pico_recipe_dict(pico, tmp_path / "run")
    recipe["teachers"][1]["model"] = str(folder)
    return write_recipe(tmp_path / "r.yaml", recipe)


def test_truncated_teacher_safetensors(pico, tmp_path, monkeypatch, capsys):
    folder = teacher_copy(pico, tmp_path, "truncated")
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    expect_exit_2(["run", str(with_teacher(pico, tmp_path, folder))],
                  [f"teachers[prose]: {weights} is corrupt or truncated", "copy or download the model again"],
                  monkeypatch, capsys, tmp_path / "run")


def test_missing_tokenizer(pico, tmp_path, monkeypatch, capsys):
    folder = teacher_copy(pico, tmp_path, "no_tokenizer")
    for path in folder.iterdir():
        if path.name not in ("config.json", "generation_config.json", "model.safetensors"):
            path.unlink()
    expect_exit_2(["run", str(with_teacher(pico, tmp_path, folder))],
                  [f"teacher 'prose': {folder} holds no tokenizer", "tokenizer.save_pretrained"],
                  monkeypatch, capsys, tmp_path / "run")


def test_damaged_tokenizer_file(pico, tmp_path, monkeypatch, capsys):
    folder = teacher_copy(pico, tmp_path, "bad_tokenizer")
    (folder / "tokenizer.json").write_text("{ not json")
    expect_exit_2(["validate", str(with_teacher(pico, tmp_path, folder))],
                  [f"teacher 'prose': cannot load the tokenizer in {folder}", "damaged"], monkeypatch, capsys)


def test_damaged_model_config(pico, tmp_path, monkeypatch, capsys):
    folder = teacher_copy(pico, tmp_path, "bad_config")
    (folder / "config.json").write_text("{ not json")
    expect_exit_2(["validate", str(with_teacher(pico, tmp_path, folder))],
                  [f"teachers[1].model: {folder / 'config.json'} is not valid JSON", "copy or download it again"],
                  monkeypatch, capsys)


def test_student_layers_out_of_range(make_recipe, monkeypatch, capsys):
    path = make_recipe(student={"from_teacher": {"teacher": "code", "layers": [0, 5]}})
    expect_exit_2(["run", str(path)], ["student.from_teacher.layers: [5] out of range; the teacher has layers 0..1"],
                  monkeypatch, capsys, path.parent / "run")


def test_student_config_override_unknown_field(make_recipe, monkeypatch, capsys):
    path = make_recipe(student={"from_config": {"base": "code", "overrides": {"num_layerz": 1}}})
    expect_exit_2(["run", str(path)], ["student.from_config.overrides: ['num_layerz'] are not fields of LlamaConfig"],
                  monkeypatch, capsys, path.parent / "run")


# -- the output location and the disk ---------------------------------------------------------


def test_output_dir_under_a_regular_file(pico, tmp_path, monkeypatch, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    recipe = pico_recipe_dict(pico, blocker / "run")
    expect_exit_2(["run", str(write_recipe(tmp_path / "r.yaml", recipe))],
                  [f"output.dir: cannot create {blocker / 'run'}: {blocker} is a file, not a folder"],
                  monkeypatch, capsys)
    assert blocker.read_text() == "not a folder"


def test_output_dir_with_foreign_files_is_never_deleted(make_recipe, tmp_path, monkeypatch, capsys):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "thesis.tex").write_text("precious")
    expect_exit_2(["run", str(make_recipe()), "--overwrite"],
                  ["holds files that are not a merge-distill run; refusing to delete them"], monkeypatch, capsys)
    assert (tmp_path / "run" / "thesis.tex").read_text() == "precious"


def test_disk_full_while_writing_a_checkpoint(make_recipe, tmp_path, monkeypatch, capsys):
    def full_disk(self, output_dir, **kwargs):
        Path(output_dir).mkdir(parents=True, exist_ok=True)
        (Path(output_dir) / "model.safetensors").write_bytes(b"\0" * 100)  # a part, then the disk is full
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Accelerator, "save_state", full_disk)
    path = make_recipe(output={"dir": "run", "save_every": 1})
    run_dir = tmp_path / "run"
    expect_exit_2(["run", str(path)], [f"{run_dir / 'checkpoints' / 'step-000001'}: the disk is full",
                                       "free some space", "--resume"], monkeypatch, capsys, run_dir, validate_sees=False)
    assert not (run_dir / "checkpoints" / "step-000001").exists()
    assert json.loads((run_dir / "run.json").read_text())["status"] == "failed"


def test_disk_full_while_writing_metrics(make_recipe, tmp_path, monkeypatch, capsys):
    real_open = open

    def full_disk_open(file, mode="r", *args, **kwargs):
        if str(file).endswith("metrics.jsonl") and "a" in mode:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_open(file, mode, *args, **kwargs)

    monkeypatch.setattr(rundir, "open", full_disk_open, raising=False)
    path = make_recipe()
    expect_exit_2(["run", str(path)], [f"{tmp_path / 'run' / 'metrics.jsonl'}: the disk is full"],
                  monkeypatch, capsys, tmp_path / "run", validate_sees=False)


# -- recipe files and overrides ----------------------------------------------------------------


@pytest.mark.parametrize("content,fragment", [
    (b"", "the file is empty; a recipe is a YAML mapping of sections"),
    (b"- teachers\n- student\n", "a recipe must be a YAML mapping of sections"),
    (b"\xff\xfe\x00name: x", "not a UTF-8 text file"),
], ids=["empty-recipe", "list-recipe", "binary-recipe"])
def test_unusable_recipe_file(content, fragment, tmp_path, monkeypatch, capsys):
    path = tmp_path / "r.yaml"
    path.write_bytes(content)
    expect_exit_2(["validate", str(path)], [f"{path}: {fragment}"], monkeypatch, capsys)


@pytest.mark.parametrize("override,fragment", [
    ("teachers.7.name=x", "override teachers.7.name: teachers.7 needs a list index from 0 to 1, got '7'"),
    ("train.steps.max=3", "override train.steps.max: train.steps is a plain value (3), not a section"),
    ("=3", "override '=3' has an empty key part"),
], ids=["index-out-of-range", "into-a-plain-value", "empty-key"])
def test_malformed_override(override, fragment, make_recipe, monkeypatch, capsys):
    expect_exit_2(["validate", str(make_recipe()), override], [fragment], monkeypatch, capsys)


# -- what only the run's start used to see ---------------------------------------------------


def test_output_dir_that_is_a_file(make_recipe, tmp_path, monkeypatch, capsys):
    (tmp_path / "run").write_text("a file where the run folder should be")
    expect_exit_2(["run", str(make_recipe())], [f"output.dir: {tmp_path / 'run'} is a file, not a folder"],
                  monkeypatch, capsys)
    assert (tmp_path / "run").read_text() == "a file where the run folder should be"


def test_existing_run_without_overwrite_or_resume(make_recipe, tmp_path, monkeypatch, capsys):
    path = make_recipe(train={"steps": 1, "micro_batch_size": 2})
    assert run_cli(["run", str(path)], monkeypatch, capsys)[0] == 0
    expect_exit_2(["run", str(path)], ["already holds a run with checkpoints; pass --resume to continue it, or --overwrite"], monkeypatch, capsys)
    code, text = run_cli(["validate", str(path), "--overwrite"], monkeypatch, capsys)
    assert code == 0 and "online source" in text, text


def test_cache_whose_data_changed_since_it_was_written(make_recipe, pico, tmp_path, monkeypatch, capsys):
    data = tmp_path / "code.jsonl"
    data.write_text(pico["code"].read_text())
    train = [{"type": "jsonl", "path": str(data), "domain": "code", "max_examples": 3}]
    path = make_recipe(data={"seq_len": 32, "train": train}, cache={"dir": str(tmp_path / "cache"), "k": 8})
    assert run_cli(["cache", str(path)], monkeypatch, capsys)[0] == 0
    data.write_text(pico["prose"].read_text())  # same file, other text: only the tokenized rows show it
    expect_exit_2(["run", str(path), "cache.use=true"], ["data.train", "rewrite it with `merge-distill cache"],
                  monkeypatch, capsys, tmp_path / "run")
