"""LoRA students through peft (`student.lora`): only the adapters train, the saved adapter and the
merged model reload with the in-memory model's logits, resume after SIGKILL is bitwise exact,
and bad LoRA settings are refused at validate."""

from __future__ import annotations

import io
import os
import signal
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from rich.console import Console
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from conftest import pico_recipe_dict, run_cli, write_recipe
from merge_distill.distributed import accelerator_for
from merge_distill.engine import finish, run, setup_run, train_step
from merge_distill.evaluate import load_saved_student
from merge_distill.recipe import load_recipe
from test_resume import start_cli, wait_for_rows

pytestmark = pytest.mark.usefixtures("one_thread")
LORA = {"r": 4, "alpha": 8.0, "target_modules": ["q_proj", "v_proj"]}
STEPS = 6


def lora_recipe(pico, folder: Path, merge: bool, **train) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    recipe = pico_recipe_dict(pico, folder / "run",
                              train={"steps": STEPS, "micro_batch_size": 2, "lr": 5e-3, "seed": 0, "log_every": 1,
                                     **train},
                              output={"dir": str(folder / "run"), "merge_lora": merge, "save_every": 1, "keep_last": 2})
    recipe["student"] = {"model": str(pico["student"]), "lora": LORA}
    return write_recipe(folder / "recipe.yaml", recipe)


def logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_only_the_adapters_train_and_the_merged_model_reloads_with_the_same_logits(pico, tmp_path) -> None:
    recipe = load_recipe(lora_recipe(pico, tmp_path, merge=True))
    current = setup_run(recipe, console=Console(file=io.StringIO()))
    for step in range(STEPS):
        train_step(current.training, current.plan, step)
    model = current.training.student
    assert isinstance(model, PeftModel)
    original = load_file(str(pico["student"] / "model.safetensors"))
    for name, param in model.named_parameters():
        if "lora_" in name:
            assert param.requires_grad
        else:  # the base: frozen and unchanged, bit for bit
            assert not param.requires_grad
            plain = name.removeprefix("base_model.model.").replace(".base_layer.", ".")
            assert torch.equal(param.detach(), original[plain]), plain
    assert any(float(p.abs().max()) > 0 for n, p in model.named_parameters() if "lora_B" in n)  # they trained
    from merge_distill import checkpoint as ckpt
    finish(current, "complete", ckpt.Progress(STEPS, 0, 0), 1.0)
    ids = torch.arange(40).unsqueeze(0) % 300 + 5
    model.eval()
    expected = logits(model, ids)
    merged = AutoModelForCausalLM.from_pretrained(current.run_dir / "student")  # plain transformers, no peft
    assert not any("lora" in n for n, _ in merged.named_parameters())
    assert torch.allclose(logits(merged, ids), expected, atol=1e-5)
    base = AutoModelForCausalLM.from_pretrained(pico["student"])
    adapter = PeftModel.from_pretrained(base, current.run_dir / "student" / "adapter")
    assert torch.allclose(logits(adapter, ids), expected, atol=1e-5)
    assert not torch.allclose(logits(AutoModelForCausalLM.from_pretrained(pico["student"]), ids), expected, atol=1e-3)


def test_an_adapter_alone_is_saved_and_evaluated_on_its_base(pico, tmp_path) -> None:
    run_dir = run(load_recipe(lora_recipe(pico, tmp_path, merge=False)), console=Console(file=io.StringIO()))
    student = run_dir / "student"
    assert (student / "adapter_config.json").is_file() and not (student / "model.safetensors").exists()
    import json

    trained = json.loads((run_dir / "run.json").read_text())["trained"]  # the report's "trained" row
    from merge_distill.models import with_lora
    from merge_distill.schema import LoraSection

    reference = with_lora(AutoModelForCausalLM.from_pretrained(pico["student"]), LoraSection(**LORA))
    total = sum(p.numel() for p in reference.parameters())
    adapters = sum(p.numel() for n, p in reference.named_parameters() if "lora_" in n)
    assert trained == (f"LoRA adapters r 4, alpha 8 on q_proj, v_proj: {adapters:,} of {total:,} parameters "
                       f"({100 * adapters / total:.2f}%); the base frozen")
    recipe = load_recipe(run_dir / "recipe.yaml")
    model, _ = load_saved_student(recipe, accelerator_for(recipe), student)
    ids = torch.arange(40).unsqueeze(0) % 300 + 5
    on_base = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(pico["student"]), student)
    assert torch.allclose(logits(model, ids), logits(on_base, ids), atol=1e-5)


def test_sigkill_then_resume_is_bitwise_exact(pico, tmp_path, monkeypatch, capsys) -> None:
    reference = run(load_recipe(lora_recipe(pico, tmp_path / "ref", merge=True)), console=Console(file=io.StringIO()))
    recipe = lora_recipe(pico, tmp_path / "killed", merge=True)
    run_dir = tmp_path / "killed" / "run"
    proc = start_cli(recipe)
    wait_for_rows(proc, run_dir / "metrics.jsonl", 3)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL and not (run_dir / "student").exists()
    code, out = run_cli(["run", str(recipe), "--resume", "--no-color"], monkeypatch, capsys)
    assert code == 0 and "resuming from" in out, out
    for part in ("model.safetensors", "adapter/adapter_model.safetensors"):
        got, want = load_file(str(run_dir / "student" / part)), load_file(str(reference / "student" / part))
        assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want), part
    assert (run_dir / "metrics.jsonl").read_text().count("\n") == STEPS


@pytest.mark.parametrize("change,message", [
    (lambda r: r["student"]["lora"].update(target_modules=["q_proj", "attn_qkv"]),
     "student.lora.target_modules: ['attn_qkv'] are not linear layers of the student; it has ['down_proj', 'gate_proj', "
     "'k_proj', 'lm_head', 'o_proj', 'q_proj', 'up_proj', 'v_proj']"),
    (lambda r: r.update(student={"from_teacher": {"teacher": "code", "layers": [0]}, "lora": LORA},
                        output={**r["output"], "merge_lora": False}),
     "student.lora: the student's base is built from a teacher"),
    (lambda r: r.update(student={"model": r["student"]["model"]}), "output.merge_lora is true but the student has no lora"),
])
def test_bad_lora_settings_are_refused_at_validate(pico, tmp_path, monkeypatch, capsys, change, message) -> None:
    import yaml

    path = lora_recipe(pico, tmp_path, merge=True)
    recipe = yaml.safe_load(path.read_text())
    change(recipe)
    write_recipe(path, recipe)
    code, out = run_cli(["validate", str(path)], monkeypatch, capsys)
    assert code == 2 and message in " ".join(out.split()) and "Traceback" not in out


def test_a_self_teacher_shares_the_frozen_base_of_a_lora_student(pico, tmp_path) -> None:
    """No second copy: the `self` teacher holds no parameter of its own, and after training steps
    it still answers with the student's initial weights (the base with the adapters off)."""
    from merge_distill.models import LoraBase

    path = lora_recipe(pico, tmp_path, merge=True)
    recipe = load_recipe(path, ["train.steps=3"])
    recipe.teachers[1].model = "self"
    current = setup_run(recipe, console=Console(file=io.StringIO()))
    source = current.training.source
    teacher = source.models[1]
    assert isinstance(teacher, LoraBase) and source.held_bytes()[1] == (0, 0)
    for step in range(3):
        train_step(current.training, current.plan, step)
    student = current.training.student
    assert student.training  # the teacher's forward left the student in training mode
    ids = torch.arange(40).unsqueeze(0) % 300 + 5
    initial = AutoModelForCausalLM.from_pretrained(pico["student"])
    assert torch.allclose(logits(teacher, ids), logits(initial, ids), atol=1e-6)
    assert not torch.allclose(logits(student, ids), logits(initial, ids), atol=1e-3)  # the student did move
