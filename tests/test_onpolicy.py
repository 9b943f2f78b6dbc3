"""On-policy micro-batches (onpolicy.py): prompts, the sampled rows' layout, seeding, the teachers'
reverse KL on samples, exactness (lmbda 0 is an off-policy run; resume after SIGKILL is bitwise),
the report, and the validation errors, each naming its key."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import pico_recipe_dict, run_cli, write_recipe
from merge_distill.engine import run
from merge_distill.onpolicy import OnPolicy, SampledStats, last_run_start, prompt_of, rollout
from merge_distill.recipe import load_recipe
from merge_distill.report.build import build_report
from merge_distill.schema import OnPolicySection
from merge_distill.signals import IGNORE_INDEX, TokenBatch
from merge_distill.sources.signals import DenseSignals, LossSetup
from merge_distill.losses import DIVERGENCES
from test_resume import losses, quiet, start_cli, wait_for_rows, weights

PAD, EOS = 0, 2


def policy(lmbda: float = 1.0, rank: int = 0, vocab_size: int | None = None, **fields) -> OnPolicy:
    return OnPolicy(OnPolicySection(lmbda=lmbda, **fields), seed=0, pad_id=PAD, eos_id=EOS, rank=rank, synced=False,
                    vocab_size=vocab_size)


def test_prompts_chat_text_and_none():
    ids = torch.arange(10, 20)
    mask = torch.tensor([1] * 8 + [0, 0])
    chat = torch.full((10,), IGNORE_INDEX)
    chat[3:5] = ids[3:5]  # first assistant turn
    chat[6:8] = ids[6:8]  # last assistant turn
    assert last_run_start(mask, chat) == 6
    assert prompt_of(ids, mask, chat, 4).tolist() == list(range(10, 16))  # up to the last turn, earlier turns included
    text = torch.where(mask.bool(), ids, IGNORE_INDEX)
    assert last_run_start(mask, text) == 0
    assert prompt_of(ids, mask, text, 5).tolist() == list(range(10, 15))
    assert prompt_of(ids, mask, text, 9) is None  # 8 real tokens: too short for a 9-token prefix
    assert prompt_of(ids, mask, torch.full((10,), IGNORE_INDEX), 4) is None


def test_choice_is_per_step_and_micro_batch_and_the_same_on_every_rank():
    half = [policy(0.5, rank=r) for r in (0, 1)]
    draws = [[p.chosen(step, m) for step in range(500) for m in range(4)] for p in half]
    assert draws[0] == draws[1]
    assert 0.45 < sum(draws[0]) / len(draws[0]) < 0.55
    assert not any(policy(0.0).chosen(s, 0) for s in range(100))
    assert all(policy(1.0).chosen(s, 0) for s in range(100))
    # sampling seeds differ by rank (each process samples its own prompts) and by step
    assert half[0].sampling_seed(3, 1) != half[1].sampling_seed(3, 1) != half[1].sampling_seed(4, 1)


@pytest.fixture(scope="module")
def student(pico):
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_pretrained(pico["student"]).eval()


def text_batch(n: int = 3, T: int = 12) -> TokenBatch:
    ids = torch.randint(3, 60, (n, T), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, 9:] = 0
    labels = torch.where(mask.bool(), ids, IGNORE_INDEX)
    return TokenBatch(ids, mask, labels, ["code"] * n, ["code"] * n, [0, 1, 2])


def test_rollout_layout_matches_the_model_reading_its_own_samples(student):
    """Greedy samples rewritten as prompt + completion from position 0: teacher-forcing the
    student on the rewritten rows gives, at every completion position, the token it sampled
    (positions, padding and the target shift all line up)."""
    batch = text_batch()
    p = policy(1.0, temperature=0.0, max_new_tokens=7, prompt_tokens=5)
    out = rollout(student, batch, p, seed=3)
    assert out.on_policy and out.row_index is None and out.domains == batch.domains
    targets = out.targets
    with torch.no_grad():
        logits = student(input_ids=out.input_ids, attention_mask=out.attention_mask).logits
    for b in range(3):
        n = int(out.attention_mask[b].sum())
        assert out.input_ids[b, :5].tolist() == batch.input_ids[b, :5].tolist()  # the prompt, unshifted
        assert (out.labels[b, :5] == IGNORE_INDEX).all() and (out.labels[b, n:] == IGNORE_INDEX).all()
        assert (out.labels[b, 5:n] == out.input_ids[b, 5:n]).all()  # targets: the completion only
        completion = out.input_ids[b, 5:n]
        assert 1 <= len(completion) <= 7
        if len(completion) < 7:
            assert completion[-1] == EOS and (completion[:-1] != EOS).all()
        where = targets[b] != IGNORE_INDEX
        assert torch.equal(logits[b][where].argmax(-1), targets[b][where])


def test_sampling_is_seeded(student):
    batch = text_batch()
    p = policy(1.0, temperature=1.5, max_new_tokens=6, prompt_tokens=5)
    a, b, c = (rollout(student, batch, p, seed=s) for s in (7, 7, 8))
    assert torch.equal(a.input_ids, b.input_ids)
    assert not torch.equal(a.input_ids, c.input_ids)
    state = torch.random.get_rng_state()
    rollout(student, batch, p, seed=9)
    assert torch.equal(state, torch.random.get_rng_state()), "sampling must not move the global generator"


def test_padded_embedding_rows_are_never_sampled(student):
    """Ids past the tokenizer (padded embedding rows) are no tokens: a teacher could not grade them."""
    p = policy(1.0, vocab_size=40, temperature=3.0, max_new_tokens=12, prompt_tokens=5)
    out = rollout(student, text_batch(), p, seed=5)
    sampled = out.labels[out.labels != IGNORE_INDEX]
    assert sampled.numel() > 0 and int(sampled.max()) < 40 < student.config.vocab_size


def test_reverse_kl_on_samples_equals_the_plain_formula():
    g = torch.Generator().manual_seed(0)
    B, T, V, K = 2, 5, 11, 2
    student_logits = torch.randn(B, T, V, generator=g)
    teachers = [torch.randn(B, T, V, generator=g) * 2 for _ in range(K)]
    targets = torch.randint(0, V, (B, T), generator=g)
    targets[0, :2] = IGNORE_INDEX
    weights = torch.softmax(torch.randn(B, T, K, generator=g), -1) * (targets != IGNORE_INDEX)[..., None]
    signals = DenseSignals(["a", "b"], teachers, torch.zeros(B, T, K), torch.zeros(B, T, K))
    entry = DIVERGENCES.get("forward_kl")
    setup = LossSetup(entry.impl, entry.config_cls(kind="forward_kl", temperature=2.0), "mixture", 4)
    stats = SampledStats.of(signals, student_logits, weights, targets, setup)
    mask = targets != IGNORE_INDEX
    logq = torch.log_softmax(student_logits / 2.0, -1)[mask].double()
    for j in range(K):
        logp = torch.log_softmax(teachers[j] / 2.0, -1)[mask].double()
        assert stats.reverse_kl[j] == pytest.approx(float((logq.exp() * (logq - logp)).sum()), rel=1e-5)
    assert stats.covered.tolist() == [int(mask.sum())] * K and stats.tokens == int(mask.sum())
    summary = stats.summary(["a", "b"], lambda x: x)
    assert sum(summary["share"].values()) == pytest.approx(1.0)


def onpolicy_recipe(pico, folder: Path, onpolicy: dict | None, steps: int = 4, **train) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    recipe = pico_recipe_dict(
        pico, folder / "run",
        train={"steps": steps, "micro_batch_size": 2, "grad_accum": 2, "lr": 1e-3, "seed": 0, "log_every": 1, **train},
        output={"dir": str(folder / "run"), "save_every": 1},
        routing={"kind": "ce"}, loss={"kind": "reverse_kl"},
    )
    if onpolicy is not None:
        recipe["onpolicy"] = onpolicy
    return write_recipe(folder / "recipe.yaml", recipe)


SAMPLING = {"lmbda": 0.5, "max_new_tokens": 6, "prompt_tokens": 8, "temperature": 1.0, "samples": 2}


def test_lmbda_zero_is_bitwise_the_off_policy_run(pico, tmp_path):
    off = run(load_recipe(onpolicy_recipe(pico, tmp_path / "off", None)), console=quiet())
    zero = run(load_recipe(onpolicy_recipe(pico, tmp_path / "zero", {**SAMPLING, "lmbda": 0.0})), console=quiet())
    a, b = weights(off), weights(zero)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert losses(off) == losses(zero)
    assert not (zero / "onpolicy_samples.json").exists()
    assert all("on_policy" not in json.loads(line) for line in (zero / "metrics.jsonl").read_text().splitlines())


@pytest.fixture(scope="module")
def onpolicy_reference(pico, tmp_path_factory) -> Path:
    return run(load_recipe(onpolicy_recipe(pico, tmp_path_factory.mktemp("onpolicy-ref"), SAMPLING, steps=6)),
               console=quiet())


def test_on_policy_run_records_samples_shares_and_report(onpolicy_reference):
    rows = [json.loads(line) for line in (onpolicy_reference / "metrics.jsonl").read_text().splitlines()]
    sampled = [r["on_policy"]["tokens"] for r in rows]
    # 2 micro-batches of 2 rows per step, each on-policy with probability 0.5: at most 4 x 6 tokens
    assert all(0 <= n <= 4 * 6 for n in sampled) and sum(sampled) > 0
    assert any(n == 0 for n in sampled) or any(r["tokens"] > n for r, n in zip(rows, sampled))  # some data tokens
    for r in rows:
        if r["on_policy"]["tokens"]:
            assert sum(r["on_policy"]["share"].values()) == pytest.approx(1.0)
            assert all(v > 0 for v in r["on_policy"]["reverse_kl"].values())
    report = build_report(onpolicy_reference)
    on = report.on_policy
    assert on is not None and on.tokens == sum(sampled) and on.target_tokens == sum(r["tokens"] for r in rows)
    assert len(on.start) == len(on.end) == 2 and [c.prompt for c in on.start] == [c.prompt for c in on.end]
    assert set(report.curves.reverse_kl) == {"code", "prose"}


def test_sigkill_then_resume_is_bitwise_with_sampling(pico, tmp_path, onpolicy_reference, monkeypatch, capsys):
    recipe = onpolicy_recipe(pico, tmp_path, SAMPLING, steps=6)
    run_dir = tmp_path / "run"
    proc = start_cli(recipe)
    wait_for_rows(proc, run_dir / "metrics.jsonl", 3)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (run_dir / "student").exists(), "the kill came too late: the run had finished"
    code, out = run_cli(["run", str(recipe), "--resume", "--no-color"], monkeypatch, capsys)
    assert code == 0, out
    a, b = weights(run_dir), weights(onpolicy_reference)
    assert all(torch.equal(a[k], b[k]) for k in b)
    assert losses(run_dir) == losses(onpolicy_reference)
    sampled = lambda d: [json.loads(x)["on_policy"] for x in (d / "metrics.jsonl").read_text().splitlines()]  # noqa: E731
    assert sampled(run_dir) == sampled(onpolicy_reference)


@pytest.mark.parametrize("change, fragments", [
    ({"onpolicy": {"lmbda": 1.5}}, ["onpolicy.lmbda", "less than or equal to 1"]),
    ({"onpolicy": {"lmbda": 0.5}, "loss": {"kind": "forward_kl", "hard_label_weight": 1.0}},
     ["onpolicy.lmbda", "hard_label_weight"]),
    ({"onpolicy": {"lmbda": 0.5, "prompt_tokens": 200}}, ["data.train[0]", "onpolicy.prompt_tokens"]),
    ({"onpolicy": {"lmbda": 0.5, "prompt_tokens": 8, "max_new_tokens": 250}}, ["onpolicy.max_new_tokens", "context"]),
])
def test_bad_on_policy_settings_exit_2_naming_the_key(pico, tmp_path, monkeypatch, capsys, change, fragments):
    recipe = write_recipe(tmp_path / "r.yaml", pico_recipe_dict(pico, tmp_path / "run", **change))
    for command in ("validate", "run"):
        code, text = run_cli([command, str(recipe), *(["--no-color"] if command == "run" else [])], monkeypatch, capsys)
        assert code == 2, text
        assert "Traceback" not in text
        for fragment in fragments:
            assert fragment in text, f"{fragment!r} not in {text}"
    assert not (tmp_path / "run" / "student").exists()


def test_cache_and_router_needs_are_refused(cached_recipe, monkeypatch, capsys):
    from merge_distill import recipe_checks

    code, text = run_cli(["validate", str(cached_recipe(use=True)), "onpolicy.lmbda=0.5"], monkeypatch, capsys)
    assert code == 2 and "onpolicy.lmbda: 0.5 samples tokens during the run" in text
    assert "onpolicy.live_teachers: true" in text
    monkeypatch.setattr(recipe_checks, "ON_POLICY_PROVIDES", frozenset({"entropy"}))
    code, text = run_cli(["validate", str(cached_recipe()), "onpolicy.lmbda=0.5", "routing.kind=ce"],
                         monkeypatch, capsys)
    assert code == 2 and "routing.kind 'ce' needs gold_nll, which the student's sampled tokens do not give" in text


def test_cache_for_data_live_teachers_for_samples(cached_recipe, tmp_path, monkeypatch, capsys):
    """cache.use + onpolicy.live_teachers: off-policy micro-batches read the cache (the run equals a
    cached off-policy run up to its first on-policy step), on-policy ones are graded by the live
    teachers (with every micro-batch on-policy, step 1 equals the run without a cache)."""
    path = cached_recipe()
    assert run_cli(["cache", str(path)], monkeypatch, capsys)[0] == 0

    def metrics(name: str, *overrides: str) -> list[dict]:
        recipe = load_recipe(path, [f"output.dir={tmp_path / name}", "train.steps=4", "onpolicy.max_new_tokens=5",
                                    "onpolicy.prompt_tokens=6", "onpolicy.samples=0", *overrides])
        run_dir = run(recipe, console=quiet())
        return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]

    live = ["cache.use=true", "onpolicy.live_teachers=true"]
    mixed = metrics("mixed", *live, "onpolicy.lmbda=0.5")
    cached = metrics("cached", "cache.use=true")
    chosen = [policy(0.5).chosen(step, 0) for step in range(4)]
    assert any(chosen) and not chosen[0], "seed 0 draws step 1 off-policy and a later one on-policy"
    first = chosen.index(True)
    assert [r["loss"] for r in mixed[:first]] == [r["loss"] for r in cached[:first]]
    assert [r["on_policy"]["tokens"] > 0 for r in mixed] == chosen
    all_live = metrics("all-live", *live, "onpolicy.lmbda=1")
    no_cache = metrics("no-cache", "onpolicy.lmbda=1")
    assert all_live[0]["on_policy"]["tokens"] == no_cache[0]["on_policy"]["tokens"] > 0
    assert all_live[0]["loss"] == pytest.approx(no_cache[0]["loss"], rel=1e-6)
