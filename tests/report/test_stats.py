"""BlendStats: sums against hand computations, JS against a dense reference, round trips."""

from __future__ import annotations

import json
import math

import pytest
import torch

from merge_distill.report.schema import Routing
from merge_distill.report.stats import BlendStats, logit_agreement, pairwise_js


def small_batch() -> dict:
    """Two teachers (a, b), rows in domains x and y; row 1 position 1 is masked."""
    return dict(
        weights=torch.tensor([[[0.75, 0.25], [0.5, 0.5]], [[0.2, 0.8], [0.0, 0.0]]]),
        gold_nll=torch.tensor([[[1.0, 2.0], [3.0, 1.0]], [[0.5, 4.0], [9.0, 9.0]]]),
        entropy=torch.tensor([[[2.0, 1.0], [1.0, 1.0]], [[3.0, 0.5], [7.0, 7.0]]]),
        mask=torch.tensor([[True, True], [True, False]]),
        domains=["x", "y"],
        target_entropy_sum=1.5,
    )


def core(block: dict) -> dict:
    """The four routing figures of every teacher (coverage is checked on its own below)."""
    return {name: {k: v for k, v in t.items() if k not in ("aligned", "bytes_per_token")} for name, t in block.items()}


def test_summary_matches_hand_computation():
    stats = BlendStats(["a", "b"])
    stats.update(**small_batch())
    s = stats.summary()
    assert s["teachers"] == ["a", "b"] and s["tokens"] == 3
    # The inputs are float32 (0.2 is not exact there), so compare to 1e-7.
    approx = lambda d: pytest.approx(d, abs=1e-7)  # noqa: E731
    assert core(s["overall"]) == {
        "a": approx({"share": 1.45 / 3, "top_share": 0.5, "mean_nll": 1.5, "mean_entropy": 2.0}),
        "b": approx({"share": 1.55 / 3, "top_share": 0.5, "mean_nll": 7 / 3, "mean_entropy": 2.5 / 3}),
    }
    assert s["per_domain"]["x"]["tokens"] == 2
    assert core(s["per_domain"]["x"]["teachers"]) == {
        "a": approx({"share": 0.625, "top_share": 0.75, "mean_nll": 2.0, "mean_entropy": 1.5}),
        "b": approx({"share": 0.375, "top_share": 0.25, "mean_nll": 1.5, "mean_entropy": 1.0}),
    }
    assert s["per_domain"]["y"]["tokens"] == 1
    assert core(s["per_domain"]["y"]["teachers"]) == {
        "a": approx({"share": 0.2, "top_share": 0.0, "mean_nll": 0.5, "mean_entropy": 3.0}),
        "b": approx({"share": 0.8, "top_share": 1.0, "mean_nll": 4.0, "mean_entropy": 0.5}),
    }
    # without coverage information every teacher covers every token, and bytes are unknown
    assert all(t["aligned"] == 1.0 and t["bytes_per_token"] is None for t in s["overall"].values())
    assert s["blend_entropy"] == pytest.approx(0.5)
    assert s["agreement"] == []  # never measured
    Routing.model_validate(json.loads(json.dumps(s)))  # the report's schema accepts it


def random_batch(gen: torch.Generator, K: int, domains: list[str], T: int = 7) -> dict:
    B = len(domains)
    weights = torch.softmax(torch.randn(B, T, K, generator=gen) * 2, -1)
    mask = torch.rand(B, T, generator=gen) > 0.3
    return dict(
        weights=torch.where(mask.unsqueeze(-1), weights, torch.zeros_like(weights)),
        gold_nll=torch.rand(B, T, K, generator=gen) * 5,
        entropy=torch.rand(B, T, K, generator=gen) * 3,
        mask=mask,
        domains=domains,
        target_entropy_sum=float(torch.rand(1, generator=gen)) * 10,
    )


def test_shares_sum_to_one_and_domains_add_up_to_overall():
    gen = torch.Generator().manual_seed(0)
    names = ["code", "prose", "math"]
    stats = BlendStats(names)
    for _ in range(4):
        stats.update(**random_batch(gen, 3, ["code", "prose", "code", "chat"]))
    s = stats.summary()
    # Each float32 weight row sums to 1 within float32 eps; the float64 sums keep that.
    assert sum(s["overall"][n]["share"] for n in names) == pytest.approx(1.0, abs=1e-6)
    assert sum(s["overall"][n]["top_share"] for n in names) == pytest.approx(1.0, abs=1e-12)
    domains = s["per_domain"]
    assert sorted(domains) == ["chat", "code", "prose"]
    assert sum(d["tokens"] for d in domains.values()) == s["tokens"]
    for field in ("share", "top_share", "mean_nll", "mean_entropy"):
        for n in names:
            weighted = sum(d["tokens"] * d["teachers"][n][field] for d in domains.values())
            assert weighted == pytest.approx(s["tokens"] * s["overall"][n][field], rel=1e-12)
    for d in domains.values():
        assert sum(d["teachers"][n]["share"] for n in names) == pytest.approx(1.0, abs=1e-6)


def dense_js(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Reference JS in float64 from probabilities [N, V], with 0 log 0 = 0."""
    m = (p + q) / 2
    return 0.5 * (torch.xlogy(p, p) - torch.xlogy(p, m)).sum(-1) + 0.5 * (torch.xlogy(q, q) - torch.xlogy(q, m)).sum(-1)


def test_pairwise_js_matches_dense_reference_and_handles_zero_probabilities():
    gen = torch.Generator().manual_seed(1)
    a, b = torch.randn(6, 11, generator=gen) * 3, torch.randn(6, 11, generator=gen) * 3
    a[0, :5] = -math.inf  # zero probabilities in one teacher only
    b[1, :] = -math.inf
    b[1, 0] = 0.0  # b is one-hot on token 0 ...
    a[1, 0] = -math.inf  # ... where a puts no mass: disjoint supports give log 2
    la, lb = torch.log_softmax(a, -1), torch.log_softmax(b, -1)
    js = pairwise_js(la, lb)
    ref = dense_js(la.double().exp(), lb.double().exp())
    assert torch.isfinite(js).all()
    torch.testing.assert_close(js.double(), ref, atol=1e-6, rtol=1e-5)
    assert js[1].item() == pytest.approx(math.log(2), abs=1e-6)
    torch.testing.assert_close(pairwise_js(lb, la), js)  # symmetric
    assert (pairwise_js(la, la) == 0).all()


def test_agreement_matches_dense_reference_over_all_valid_tokens():
    gen = torch.Generator().manual_seed(2)
    names = ["a", "b", "c"]
    B, T, V = 2, 9, 13
    logits = [torch.randn(B, T, V, generator=gen) for _ in names]
    logits[1] = logits[0] + 0.3 * torch.randn(B, T, V, generator=gen)  # a and b mostly agree
    mask = torch.rand(B, T, generator=gen) > 0.25
    stats = BlendStats(names)
    stats.add_agreement(*logit_agreement(logits, mask, max_tokens=512, chunk_tokens=4))
    agreement = stats.summary()["agreement"]
    assert [(e["a"], e["b"]) for e in agreement] == [("a", "b"), ("a", "c"), ("b", "c")]
    for entry in agreement:
        x, y = logits[names.index(entry["a"])][mask], logits[names.index(entry["b"])][mask]
        top1 = (x.argmax(-1) == y.argmax(-1)).double().mean().item()
        js = dense_js(torch.softmax(x.double(), -1), torch.softmax(y.double(), -1)).mean().item()
        assert entry["top1_agreement"] == pytest.approx(top1, abs=1e-12)
        assert entry["js"] == pytest.approx(js, abs=1e-6)
    assert agreement[0]["js"] < agreement[1]["js"]


def test_agreement_subsample_is_deterministic_and_chunk_independent():
    gen = torch.Generator().manual_seed(3)
    logits = [torch.randn(3, 20, 17, generator=gen) for _ in range(2)]
    mask = torch.ones(3, 20, dtype=torch.bool)
    results = []
    for chunk in (2, 64, 64):
        stats = BlendStats(["p", "q"])
        stats.add_agreement(*logit_agreement(logits, mask, max_tokens=10, chunk_tokens=chunk))
        assert stats.state_dict()["agreement"]["tokens"] == 10
        results.append(stats.summary()["agreement"][0])
    assert results[0] == pytest.approx(results[1]) and results[1] == results[2]


def test_identical_teachers_agree_fully_and_single_teacher_has_no_pairs():
    logits = torch.randn(2, 5, 9)
    stats = BlendStats(["a", "b"])
    stats.add_agreement(*logit_agreement([logits, logits.clone()], torch.ones(2, 5, dtype=torch.bool)))
    (entry,) = stats.summary()["agreement"]
    assert entry["top1_agreement"] == 1.0 and entry["js"] == 0.0
    single = BlendStats(["only"])
    single.add_agreement(*logit_agreement([logits], torch.ones(2, 5, dtype=torch.bool)))
    single.update(torch.ones(2, 5, 1), torch.ones(2, 5, 1), torch.ones(2, 5, 1), torch.ones(2, 5, dtype=torch.bool), ["d", "d"], 0.0)
    assert single.summary()["agreement"] == []
    assert single.summary()["overall"]["only"]["share"] == 1.0


def filled_stats(seed: int, domains: list[str]) -> BlendStats:
    gen = torch.Generator().manual_seed(seed)
    stats = BlendStats(["a", "b", "c"])
    stats.update(**random_batch(gen, 3, domains))
    stats.add_agreement(*logit_agreement([torch.randn(2, 7, 5, generator=gen) for _ in range(3)], torch.rand(2, 7, generator=gen) > 0.5))
    return stats


def test_state_dict_round_trip_through_json():
    stats = filled_stats(4, ["code", "prose"])
    restored = BlendStats(["a", "b", "c"])
    restored.load_state_dict(json.loads(json.dumps(stats.state_dict())))
    assert restored.summary() == stats.summary()
    assert restored.state_dict() == stats.state_dict()
    with pytest.raises(ValueError, match="teachers"):
        BlendStats(["a", "b"]).load_state_dict(stats.state_dict())


def test_all_reduce_and_merge_equal_one_process_seeing_everything():
    first, second = filled_stats(5, ["code", "prose"]), filled_stats(6, ["chat", "code"])
    before = first.state_dict()
    all_domains = sorted(set(first.domains()) | set(second.domains()))
    # Simulate a 2-process sum all-reduce: each process adds the other's flat tensor.
    reduced = first.all_reduce(lambda t: t + second.to_tensor(all_domains), all_domains)
    assert first.state_dict() == before  # the local sums are untouched
    merged = filled_stats(5, ["code", "prose"])
    merged.merge(second)
    expected = BlendStats(["a", "b", "c"])
    gen5, gen6 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(6)
    for gen, domains in ((gen5, ["code", "prose"]), (gen6, ["chat", "code"])):
        expected.update(**random_batch(gen, 3, domains))
        expected.add_agreement(*logit_agreement([torch.randn(2, 7, 5, generator=gen) for _ in range(3)], torch.rand(2, 7, generator=gen) > 0.5))
    for got in (reduced, merged):
        assert got.domains() == expected.domains() == all_domains
        torch.testing.assert_close(got.to_tensor(all_domains), expected.to_tensor(all_domains), rtol=1e-12, atol=1e-12)
        assert got.summary()["tokens"] == expected.summary()["tokens"]
    with pytest.raises(ValueError, match="all_domains lacks"):
        first.to_tensor(["code"])


def test_coverage_and_bytes_per_token_per_domain() -> None:
    """covered [B, T, K] and next_bytes: aligned = covered valid tokens / valid tokens; bytes per
    token = bytes summed over covered valid tokens / their number (by hand)."""
    stats = BlendStats(["same", "other"])
    mask = torch.tensor([[True, True, True, False], [True, True, False, False]])
    covered = torch.tensor([[[True, True], [True, False], [True, True], [True, True]],
                            [[True, False], [True, True], [True, False], [True, False]]])
    nbytes = torch.tensor([[[1.0, 4.0], [2.0, 9.0], [3.0, 2.0], [5.0, 5.0]],
                           [[1.0, 7.0], [1.0, 6.0], [2.0, 2.0], [2.0, 2.0]]])
    weights = torch.full((2, 4, 2), 0.5)
    zeros = torch.zeros(2, 4, 2)
    stats.update(weights, zeros, zeros, mask, ["x", "y"], 0.0, covered, nbytes)
    s = stats.summary()
    x, y = s["per_domain"]["x"]["teachers"], s["per_domain"]["y"]["teachers"]
    assert x["same"]["aligned"] == 1.0 and x["other"]["aligned"] == pytest.approx(2 / 3)
    assert x["same"]["bytes_per_token"] == pytest.approx(6 / 3) and x["other"]["bytes_per_token"] == pytest.approx(6 / 2)
    assert y["other"]["aligned"] == pytest.approx(1 / 2) and y["other"]["bytes_per_token"] == pytest.approx(6.0)
    assert s["overall"]["other"]["aligned"] == pytest.approx(3 / 5)
    assert s["overall"]["other"]["bytes_per_token"] == pytest.approx(12 / 3)
    # the sums survive the flat layout used across processes and checkpoints
    again = BlendStats(["same", "other"])
    again.load_state_dict(stats.state_dict())
    assert again.summary() == s
