"""The whole engine under a real launcher: 2 processes (gloo, ZeRO-3 teachers) vs 1 process.

Same global batch (2 processes x 2 rows == 1 process x 4 rows, the same rows in the same
order), so the loss trajectory and the trained student must agree. Tolerance: 1e-4 relative
on losses and 1e-4 absolute on logits; the only differences are float reduction orders
(all-reduce of gradients vs one batched sum).
"""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import cli_process, pico_recipe_dict, write_recipe



def test_two_processes_match_one_process(pico, tmp_path):
    recipe = pico_recipe_dict(pico, tmp_path / "run")
    recipe["train"].update(steps=3, micro_batch_size=2, lr=5e-3, log_every=1)
    path = write_recipe(tmp_path / "r.yaml", recipe)
    two = cli_process(["launch", str(path), "--nproc", "2", f"output.dir={tmp_path / 'two'}"], tmp_path)
    assert two.returncode == 0, two.stdout[-3000:] + two.stderr[-3000:]
    one = cli_process(["run", str(path), f"output.dir={tmp_path / 'one'}", "train.micro_batch_size=4"], tmp_path)
    assert one.returncode == 0, one.stderr[-3000:]

    rows = {name: [json.loads(x) for x in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
            for name in ("one", "two")}
    assert [r["world_size"] for r in rows["two"]] == [2, 2, 2]
    for a, b in zip(rows["one"], rows["two"]):
        assert a["tokens"] == b["tokens"]
        assert abs(a["loss"] - b["loss"]) <= 1e-4 * abs(a["loss"]), (a, b)
    facts = json.loads((tmp_path / "two" / "run.json").read_text())
    assert facts["world_size"] == 2 and facts["status"] == "complete"

    ids = torch.randint(0, 300, (2, 16))
    with torch.no_grad():
        logits = [AutoModelForCausalLM.from_pretrained(tmp_path / name / "student")(ids).logits for name in ("one", "two")]
    assert torch.allclose(logits[0], logits[1], atol=1e-4)


@pytest.mark.parametrize("stage", [2, 3])
def test_lora_student_under_zero_resumes_exactly(pico, tmp_path, stage):
    """A LoRA student under DeepSpeed ZeRO-2/3 with 2 processes: the run completes, its merged
    model reloads, only the main process writes TensorBoard events, and a run resumed from a
    checkpoint (the last two removed, as a kill would leave them) ends with the same weights, bit
    for bit."""
    import shutil

    from safetensors.torch import load_file

    recipe = pico_recipe_dict(pico, tmp_path / "run")
    recipe["student"] = {"model": str(pico["student"]), "lora": {"r": 4, "alpha": 8.0, "target_modules": ["q_proj", "v_proj"]}}
    recipe["train"].update(steps=4, micro_batch_size=2, lr=5e-3, log_every=1)
    recipe["output"].update(save_every=1, keep_last=4, merge_lora=True, report_to=["tensorboard"])
    recipe["distributed"] = {"use_deepspeed": "always", "student_zero_stage": stage}
    path = write_recipe(tmp_path / "r.yaml", recipe)
    full = cli_process(["launch", str(path), "--nproc", "2", f"output.dir={tmp_path / 'full'}"], tmp_path)
    assert full.returncode == 0, full.stdout[-3000:] + full.stderr[-3000:]
    events = list((tmp_path / "full" / "trackers" / "pico").glob("events.out.tfevents.*"))
    assert len(events) == 1  # the main process logs, the other does not
    shutil.copytree(tmp_path / "full", tmp_path / "cut")
    for step in (3, 4):
        shutil.rmtree(tmp_path / "cut" / "checkpoints" / f"step-{step:06d}")
    shutil.rmtree(tmp_path / "cut" / "student")
    resumed = cli_process(["launch", str(path), "--nproc", "2", "--resume", f"output.dir={tmp_path / 'cut'}"], tmp_path)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    for part in ("model.safetensors", "adapter/adapter_model.safetensors"):
        want, got = (load_file(str(tmp_path / name / "student" / part)) for name in ("full", "cut"))
        assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want), part
    base = load_file(str(pico["student"] / "model.safetensors"))
    merged = load_file(str(tmp_path / "full" / "student" / "model.safetensors"))
    moved = [k for k in base if not torch.equal(base[k], merged[k])]
    assert moved and all("q_proj" in k or "v_proj" in k for k in moved)  # only the adapted layers changed
