"""Every recipe in recipes/ validates, and runs end to end (2 steps) on pico stand-ins.

The shipped recipes point at the demo assets; here their model and data paths are overridden
with the pico models so that every router and blend mode runs on CPU in seconds.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from e2e import run_and_check
from merge_distill.engine import setup_run, train_step
from merge_distill.recipe import load_recipe, read_yaml

RECIPES = sorted(Path(__file__).resolve().parents[1].joinpath("recipes").glob("*.yaml"))
NEEDS_REAL_MODEL = {"support_chatbot", "support_chatbot_onpolicy", "cross_smollm2_gemma"}  # pretrained 135M/270M models: covered by slow tests


def pico_overrides(path: Path, pico: dict[str, Path], out: Path) -> list[str]:
    raw = read_yaml(path)
    teachers = [str(pico["teacher_a"]), str(pico["teacher_b"])]
    out_list = [f"output.dir={out}", "train.steps=2", "train.micro_batch_size=2", "data.seq_len=32",
                "data.eval_tokens=256"]
    loaded = [i for i, t in enumerate(raw["teachers"]) if t["model"] != "self"]
    for n, i in enumerate(loaded):
        out_list.append(f"teachers.{i}.model={teachers[n % 2]}")
    if "model" in raw["student"]:
        out_list.append(f"student.model={pico['student']}")
    base = raw["student"].get("from_config", {}).get("base")
    if base is not None and base not in {t["name"] for t in raw["teachers"]}:
        out_list.append(f"student.from_config.base={pico['teacher_a']}")  # a folder: the pico one
    for section in ("train", "eval"):
        for i, _ in enumerate(raw["data"].get(section, [])):
            out_list.append(f"data.{section}.{i}.path={pico['code'] if i % 2 == 0 else pico['prose']}")
    return out_list


@pytest.mark.parametrize("path", RECIPES, ids=[p.stem for p in RECIPES])
def test_recipe_validates(path):
    recipe = load_recipe(path, check_files=False)
    assert recipe.name == path.stem


@pytest.mark.parametrize("path", [p for p in RECIPES if p.stem not in NEEDS_REAL_MODEL], ids=lambda p: p.stem)
def test_recipe_runs_end_to_end_on_pico(path, pico, tmp_path):
    recipe = load_recipe(path, pico_overrides(path, pico, tmp_path / "run"))
    run_dir, rows = run_and_check(recipe)
    assert len(rows) == 2
    stats = json.loads((run_dir / "stats.json").read_text())
    assert set(stats["overall"]) == set(recipe.teacher_names)
    if recipe.routing.kind == "learned":
        assert (run_dir / "router.safetensors").is_file()


def test_lone_self_teacher_gives_zero_loss_at_step_zero(make_recipe):
    recipe = load_recipe(make_recipe(teachers=[{"name": "me", "model": "self"}]))
    parts = setup_run(recipe)
    result = train_step(parts.training, parts.plan, 0)
    # the blend of one teacher is that teacher; the copy's logits equal the student's, so the
    # divergence is zero up to float32 rounding in the two forwards (grad vs inference mode)
    assert abs(result.divergence) < 1e-6
    assert result.ce > 0  # the student is far from the data: only the divergence is zero
