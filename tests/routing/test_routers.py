"""Every router's weights: shape, dtype, normalisation, masking, and its own formula."""

from __future__ import annotations

import pytest
import torch

from merge_distill.routing import (
    ROUTERS,
    CERouterConfig,
    DomainRouterConfig,
    EntropyRouterConfig,
    FixedRouterConfig,
    LearnedRouterConfig,
    RouterInputs,
    UniformRouterConfig,
    build_router,
)

TEACHERS = ["code", "prose", "math"]
B, T, K, H = 3, 5, 3, 8


def make_inputs(seed: int = 0) -> RouterInputs:
    gen = torch.Generator().manual_seed(seed)
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[0, 3:] = False
    mask[2, 0] = False
    gold_nll = torch.rand(B, T, K, generator=gen) * 5
    entropy = torch.rand(B, T, K, generator=gen) * 3
    gold_nll = torch.where(mask.unsqueeze(-1), gold_nll, torch.zeros_like(gold_nll))
    entropy = torch.where(mask.unsqueeze(-1), entropy, torch.zeros_like(entropy))
    hidden = torch.randn(B, T, H, generator=gen)
    return RouterInputs(gold_nll, entropy, mask, ["code", "prose", "other"], hidden)


def all_configs(**common) -> list:
    return [
        UniformRouterConfig(**common),
        FixedRouterConfig(weights={"code": 3.0, "prose": 1.0, "math": 0.0}, **common),
        EntropyRouterConfig(tau=0.5, **common),
        CERouterConfig(tau=1.0, **common),
        CERouterConfig(tau=0.0, **common),
        CERouterConfig(tau=0.3, granularity="sequence", **common),
        DomainRouterConfig(weights={"code": "code", "prose": {"prose": 2, "math": 1}}, fallback="uniform", **common),
        LearnedRouterConfig(gate="mlp", hidden=4, **common),
    ]


def test_every_registered_router_is_covered():
    assert sorted({c.kind for c in all_configs()}) == ROUTERS.names()
    for entry in ROUTERS.entries():
        assert entry.summary and "\n" not in entry.summary
        assert entry.config_cls.model_fields["kind"].default == entry.name


@pytest.mark.parametrize("common", [{}, {"top_k": 2}, {"floor": 0.2}, {"top_k": 1, "floor": 0.1}])
def test_weights_are_distributions_on_valid_positions(common):
    inputs = make_inputs()
    for config in all_configs(**common):
        w = build_router(config, TEACHERS, H)(inputs)
        assert w.shape == (B, T, K) and w.dtype == torch.float32, config.kind
        valid = inputs.mask
        torch.testing.assert_close(w[valid].sum(-1), torch.ones(int(valid.sum())), atol=1e-6, rtol=0)
        assert (w[~valid] == 0).all(), config.kind
        assert (w >= 0).all()
        if "floor" in common:
            assert (w[valid] >= common["floor"] / K - 1e-7).all(), config.kind
        if common.get("top_k") and not common.get("floor"):
            assert ((w[valid] > 0).sum(-1) <= common["top_k"]).all(), config.kind


def test_uniform():
    w = build_router(UniformRouterConfig(), TEACHERS, H)(make_inputs())
    assert torch.allclose(w[0, 0], torch.full((K,), 1 / 3))


def test_fixed_is_constant_and_normalised():
    inputs = make_inputs()
    w = build_router(FixedRouterConfig(weights={"math": 2.0, "code": 1.0, "prose": 1.0}), TEACHERS, H)(inputs)
    expected = torch.tensor([0.25, 0.25, 0.5])  # teacher order, not mapping order
    for b, t in inputs.mask.nonzero().tolist():
        torch.testing.assert_close(w[b, t], expected)


def test_entropy_formula_and_preference():
    inputs = make_inputs()
    w = build_router(EntropyRouterConfig(tau=0.7), TEACHERS, H)(inputs)
    b, t = 1, 2
    ref = torch.exp(-inputs.entropy[b, t] / 0.7)
    torch.testing.assert_close(w[b, t], ref / ref.sum())
    # The lowest-entropy teacher gets the most weight everywhere.
    valid = inputs.mask
    assert torch.equal(w[valid].argmax(-1), inputs.entropy[valid].argmin(-1))


def test_ce_soft_formula():
    inputs = make_inputs()
    w = build_router(CERouterConfig(tau=2.0), TEACHERS, H)(inputs)
    ref = torch.exp(-inputs.gold_nll[1, 4] / 2.0)
    torch.testing.assert_close(w[1, 4], ref / ref.sum())


def test_ce_small_tau_equals_hard_argmin():
    inputs = make_inputs()
    soft = build_router(CERouterConfig(tau=1e-4), TEACHERS, H)(inputs)
    hard = build_router(CERouterConfig(tau=0.0), TEACHERS, H)(inputs)
    valid = inputs.mask
    one_hot = torch.nn.functional.one_hot(inputs.gold_nll[valid].argmin(-1), K).float()
    torch.testing.assert_close(hard[valid], one_hot)
    torch.testing.assert_close(soft[valid], one_hot, atol=1e-6, rtol=0)
    # Huge NLL gaps and tiny tau do not overflow: softmax subtracts the max.
    inputs.gold_nll[valid] *= 1e3
    assert torch.isfinite(build_router(CERouterConfig(tau=1e-4), TEACHERS, H)(inputs)).all()


def test_ce_tau_zero_splits_ties_evenly():
    mask = torch.ones(1, 2, dtype=torch.bool)
    nll = torch.tensor([[[1.0, 1.0, 2.0], [0.5, 0.5, 0.5]]])
    inputs = RouterInputs(nll, torch.zeros_like(nll), mask, ["code"])
    w = build_router(CERouterConfig(tau=0.0), TEACHERS, H)(inputs)
    torch.testing.assert_close(w[0, 0], torch.tensor([0.5, 0.5, 0.0]))
    torch.testing.assert_close(w[0, 1], torch.full((3,), 1 / 3))
    # The soft limit agrees on exact ties.
    soft = build_router(CERouterConfig(tau=1e-4), TEACHERS, H)(inputs)
    torch.testing.assert_close(soft, w, atol=1e-6, rtol=0)


def test_ce_sequence_granularity_uses_row_mean_over_valid_tokens():
    inputs = make_inputs()
    tau = 0.3
    w = build_router(CERouterConfig(tau=tau, granularity="sequence"), TEACHERS, H)(inputs)
    for b in range(B):
        valid = inputs.mask[b]
        rows = w[b, valid]
        assert torch.equal(rows, rows[:1].expand_as(rows))  # constant across the row
        mean_nll = inputs.gold_nll[b, valid].mean(0)
        torch.testing.assert_close(rows[0], torch.softmax(-mean_nll / tau, -1))
    hard = build_router(CERouterConfig(tau=0.0, granularity="sequence"), TEACHERS, H)(inputs)
    best = inputs.gold_nll[0, inputs.mask[0]].mean(0).argmin()
    torch.testing.assert_close(hard[0, 0], torch.nn.functional.one_hot(best, K).float())


def test_domain_follows_mapping_and_fallback():
    config = DomainRouterConfig(
        weights={"code": "code", "prose": {"prose": 3.0, "math": 1.0}}, fallback={"math": 1.0, "code": 1.0}
    )
    inputs = make_inputs()
    inputs.domains = ["prose", "code", "legal"]
    w = build_router(config, TEACHERS, H)(inputs)
    torch.testing.assert_close(w[0, 0], torch.tensor([0.0, 0.75, 0.25]))
    torch.testing.assert_close(w[1, 4], torch.tensor([1.0, 0.0, 0.0]))
    torch.testing.assert_close(w[2, 1], torch.tensor([0.5, 0.0, 0.5]))
    uniform = config.model_copy(update={"fallback": "uniform"})
    torch.testing.assert_close(build_router(uniform, TEACHERS, H)(inputs)[2, 3], torch.full((3,), 1 / 3))


def test_domain_unknown_at_runtime_without_fallback_names_it():
    router = build_router(DomainRouterConfig(weights={"code": "code"}), TEACHERS, H)
    inputs = make_inputs()
    inputs.domains = ["code", "legal", "code"]
    with pytest.raises(ValueError, match="'legal'.*routing.fallback"):
        router(inputs)


def test_top_k_keeps_the_k_largest_and_renormalises():
    nll = torch.tensor([[[0.1, 0.7, 0.2], [3.0, 1.0, 2.0]]])
    inputs = RouterInputs(nll, torch.zeros_like(nll), torch.ones(1, 2, dtype=torch.bool), ["code"])
    raw = torch.softmax(-nll, -1)
    w = build_router(CERouterConfig(top_k=2), TEACHERS, H)(inputs)
    ref0 = torch.tensor([raw[0, 0, 0], 0.0, raw[0, 0, 2]])
    ref1 = torch.tensor([0.0, raw[0, 1, 1], raw[0, 1, 2]])
    torch.testing.assert_close(w[0, 0], ref0 / ref0.sum())
    torch.testing.assert_close(w[0, 1], ref1 / ref1.sum())


def test_top_k_ties_go_to_the_teacher_listed_first():
    inputs = make_inputs()
    w = build_router(UniformRouterConfig(top_k=2), TEACHERS, H)(inputs)
    valid = inputs.mask
    torch.testing.assert_close(w[valid], torch.tensor([0.5, 0.5, 0.0]).expand(int(valid.sum()), K))
    w1 = build_router(UniformRouterConfig(top_k=1), TEACHERS, H)(inputs)
    assert (w1[valid][:, 0] == 1).all()


def test_floor_formula():
    inputs = make_inputs()
    plain = build_router(EntropyRouterConfig(), TEACHERS, H)(inputs)
    floored = build_router(EntropyRouterConfig(floor=0.3), TEACHERS, H)(inputs)
    valid = inputs.mask
    torch.testing.assert_close(floored[valid], 0.7 * plain[valid] + 0.1)
    # top_k first, then floor: a dropped teacher gets exactly floor / K.
    hard = build_router(CERouterConfig(tau=0.0, top_k=1, floor=0.3), TEACHERS, H)(inputs)
    assert torch.allclose(hard[valid].min(-1).values, torch.tensor(0.1))
    assert torch.allclose(hard[valid].max(-1).values, torch.tensor(0.8))


def test_weights_carry_no_gradient():
    router = build_router(LearnedRouterConfig(), TEACHERS, H)
    w = router(make_inputs())
    assert not w.requires_grad
    torch.testing.assert_close(w[1, 1], torch.full((K,), 1 / 3))  # zero-initialised gate = uniform
