"""onpolicy.engine: vllm (merge_distill/vllm_engine.py) against a stand-in with vLLM's interface
(`LLM(...)`, `llm.generate(requests, sampling_params=...)`, `SamplingParams(...)`, and the colocated
model's `load_weights`, as TRL's colocate mode reaches it): what the engine is started with, when
the student's weights are copied in, what each request asks for, how completions come back, a run
that samples through it, and the validation errors. No GPU and no vLLM are needed (nor available
in CI); docs/ONPOLICY.md says so."""

from __future__ import annotations

import importlib.machinery
import json
import sys
import types
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import pico_recipe_dict, run_cli, write_recipe
from merge_distill.schema import OnPolicySection
from merge_distill.vllm_engine import VLLMSampler

EOS = 2


class FakeLLM:
    """What the engine uses of vllm.LLM. Every request samples max_tokens tokens, a function of its
    seed and prompt; a request with an even seed ends with EOS at its 3rd token."""

    made: list["FakeLLM"] = []

    def __init__(self, **kwargs):
        self.kwargs = kwargs
        self.loaded: list[dict[str, torch.Tensor]] = []
        self.requests: list[tuple[list[dict], list]] = []
        model = types.SimpleNamespace(load_weights=lambda items: self.loaded.append({n: t.clone() for n, t in items}))
        runner = types.SimpleNamespace(model=model)
        self.llm_engine = types.SimpleNamespace(
            model_executor=types.SimpleNamespace(driver_worker=types.SimpleNamespace(model_runner=runner)))
        FakeLLM.made.append(self)

    def generate(self, requests, sampling_params, use_tqdm):
        assert use_tqdm is False and len(requests) == len(sampling_params)
        self.requests.append((requests, sampling_params))
        outputs = []
        for request, params in zip(requests, sampling_params):
            tokens = [5 + (params.seed + sum(request["prompt_token_ids"]) + i) % 40 for i in range(params.max_tokens)]
            if params.seed % 2 == 0:
                tokens[2] = EOS
            outputs.append(types.SimpleNamespace(outputs=[types.SimpleNamespace(token_ids=tokens)]))
        return outputs


class FakeSamplingParams:
    def __init__(self, **kwargs):
        self.__dict__.update(kwargs)


@pytest.fixture
def fake_vllm(monkeypatch):
    module = types.ModuleType("vllm")
    module.LLM, module.SamplingParams = FakeLLM, FakeSamplingParams
    module.__spec__ = importlib.machinery.ModuleSpec("vllm", None)
    monkeypatch.setitem(sys.modules, "vllm", module)
    FakeLLM.made.clear()
    return module


def config(**fields) -> OnPolicySection:
    return OnPolicySection(**{"lmbda": 0.5, "max_new_tokens": 6, "temperature": 0.7, "top_p": 0.9, "engine": "vllm",
                              **fields})


def test_the_engine_starts_syncs_on_schedule_and_samples_as_the_recipe_says(pico, fake_vllm):
    student = AutoModelForCausalLM.from_pretrained(pico["student"])
    V = student.config.vocab_size
    sampler = VLLMSampler(str(pico["student"]), config(vllm_sync_every=2), "bfloat16", 96, EOS, V - 8, V,
                          distributed=False)
    (llm,) = FakeLLM.made
    assert llm.kwargs == {"model": str(pico["student"]), "dtype": "bfloat16", "max_model_len": 96,
                          "gpu_memory_utilization": 0.3, "enable_prefix_caching": False}

    synced = []
    for step in range(5):
        with torch.no_grad():
            next(student.parameters()).add_(1.0)  # a training step changed the student
        if sampler.sync(student, step):
            synced.append(step)
            state = student.state_dict()
            assert set(llm.loaded[-1]) == set(state)
            assert all(torch.equal(llm.loaded[-1][n], state[n]) for n in state)
    assert synced == [0, 2, 4]

    prompts = [torch.tensor([7, 8, 9]), None, torch.tensor([10, 11])]
    completions = sampler.sample(prompts, seed=100, pad_id=0)
    requests, params = llm.requests[-1]
    assert [r["prompt_token_ids"] for r in requests] == [[7, 8, 9], [0], [10, 11]]
    assert [p.seed for p in params] == [100, 101, 102]  # the micro-batch's seed, then one per request
    for p in params:
        assert (p.n, p.max_tokens, p.temperature, p.top_p, p.top_k) == (1, 6, 0.7, 0.9, -1)
        assert p.allowed_token_ids == list(range(V - 8)) and p.stop_token_ids == [EOS]
    # even seeds end at their EOS, which they keep; odd seeds run to max_new_tokens
    assert [len(c) for c in completions] == [3, 6, 3] and int(completions[0][-1]) == EOS
    assert all(c.dtype == torch.long for c in completions)

    sampler.sample(prompts, seed=7, greedy=True)
    assert all(p.temperature == 0.0 and p.top_p == 1.0 for p in llm.requests[-1][1])
    unpadded = VLLMSampler("m", config(), "float32", 96, None, V, V, distributed=True)
    assert FakeLLM.made[-1].kwargs["distributed_executor_backend"] == "external_launcher"
    assert unpadded.sampling_params(1, False).allowed_token_ids is None


def test_an_on_policy_run_samples_through_the_engine(pico, tmp_path, fake_vllm, monkeypatch):
    """lmbda 1 with engine: vllm: every micro-batch is the engine's samples, its weights copied from
    the student before each step's sampling; the run trains on them and reports them."""
    from merge_distill import recipe_checks
    from merge_distill.engine import run
    from merge_distill.recipe import load_recipe
    from test_resume import quiet

    monkeypatch.setattr(recipe_checks.torch.cuda, "is_available", lambda: True)
    recipe = pico_recipe_dict(pico, tmp_path / "run", routing={"kind": "ce"}, loss={"kind": "reverse_kl"},
                              train={"steps": 3, "micro_batch_size": 2, "lr": 1e-3, "seed": 0, "log_every": 1})
    recipe["onpolicy"] = {"lmbda": 1.0, "max_new_tokens": 6, "prompt_tokens": 8, "engine": "vllm", "samples": 0}
    run_dir = run(load_recipe(write_recipe(tmp_path / "r.yaml", recipe)), console=quiet())
    (llm,) = FakeLLM.made
    assert len(llm.loaded) == 3 and len(llm.requests) == 3  # one copy and one micro-batch per step
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 3
    for row, (requests, params) in zip(rows, llm.requests):
        expected = sum(3 if p.seed % 2 == 0 else 6 for p in params)  # the fake's completion lengths
        assert row["on_policy"]["tokens"] == row["tokens"] == expected
    assert (run_dir / "student" / "model.safetensors").is_file()


@pytest.mark.parametrize("change, fragment", [
    ({}, "onpolicy.engine: vllm needs the vllm package"),
    ({"fake": True}, "onpolicy.engine: vllm runs on a CUDA GPU and none is visible"),
    ({"fake": True, "lora": True}, "onpolicy.engine: vllm takes the student's full weights, but student.lora"),
    ({"fake": True, "zero3": True}, "distributed.student_zero_stage 3 partitions them"),
])
def test_bad_engine_settings_exit_2_naming_the_key(pico, tmp_path, monkeypatch, capsys, change, fragment):
    if change.get("fake"):
        module = types.ModuleType("vllm")
        module.__spec__ = importlib.machinery.ModuleSpec("vllm", None)
        monkeypatch.setitem(sys.modules, "vllm", module)
    else:
        monkeypatch.delitem(sys.modules, "vllm", raising=False)
    recipe = pico_recipe_dict(pico, tmp_path / "run", routing={"kind": "ce"}, loss={"kind": "reverse_kl"})
    recipe["onpolicy"] = {"lmbda": 0.5, "engine": "vllm"}
    if change.get("lora"):
        recipe["student"]["lora"] = {"r": 4}
    if change.get("zero3"):
        recipe["distributed"] = {"student_zero_stage": 3}
    code, text = run_cli(["validate", str(write_recipe(tmp_path / "r.yaml", recipe))], monkeypatch, capsys)
    assert code == 2 and "Traceback" not in text
    assert fragment in text, text
    assert not Path(tmp_path / "run" / "student").exists()
