"""On-policy micro-batches on 2 processes (gloo) with a ZeRO-3 student: every process samples its
own rows' prompts (generate's forwards kept in step across processes by synced_gpus), and with
greedy sampling the first step equals 1 process reading the same 4 rows.

Same global batch (2 processes x 2 rows == 1 process x 4 rows). Greedy samples depend only on
the prompt and the weights, so the sampled tokens, their count and the loss of step 1 agree;
the loss within 1e-4 relative (float reduction orders, ZeRO-3 against plain).
"""

from __future__ import annotations

import json

from conftest import cli_process, pico_recipe_dict, write_recipe


def test_two_processes_sample_their_own_prompts(pico, tmp_path):
    recipe = pico_recipe_dict(pico, tmp_path / "run", loss={"kind": "reverse_kl"},
                              onpolicy={"lmbda": 1.0, "temperature": 0.0, "max_new_tokens": 6, "prompt_tokens": 8,
                                        "samples": 2})
    recipe["train"].update(steps=2, micro_batch_size=2, lr=5e-3, log_every=1)
    path = write_recipe(tmp_path / "r.yaml", recipe)
    two = cli_process(["launch", str(path), "--nproc", "2", f"output.dir={tmp_path / 'two'}",
                       "distributed.use_deepspeed=always", "distributed.student_zero_stage=3"], tmp_path)
    assert two.returncode == 0, two.stdout[-3000:] + two.stderr[-3000:]
    one = cli_process(["run", str(path), f"output.dir={tmp_path / 'one'}", "train.micro_batch_size=4"], tmp_path)
    assert one.returncode == 0, one.stderr[-3000:]
    rows = {name: [json.loads(x) for x in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
            for name in ("one", "two")}
    assert [r["world_size"] for r in rows["two"]] == [2, 2]
    a, b = rows["one"][0], rows["two"][0]
    assert a["tokens"] == b["tokens"] == a["on_policy"]["tokens"] == b["on_policy"]["tokens"] > 0
    assert abs(a["loss"] - b["loss"]) <= 1e-4 * abs(a["loss"]), (a, b)
    for name, value in a["on_policy"]["reverse_kl"].items():
        assert abs(value - b["on_policy"]["reverse_kl"][name]) <= 1e-4 * abs(value)
    samples = {name: json.loads((tmp_path / name / "onpolicy_samples.json").read_text()) for name in ("one", "two")}
    assert samples["one"]["start"] == samples["two"]["start"] and len(samples["two"]["end"]) == 2
