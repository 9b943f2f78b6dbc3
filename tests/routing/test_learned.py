"""The learned gate: its objective matches the plain mixture likelihood, and it learns to route."""

from __future__ import annotations

import math

import torch

from merge_distill.routing import LearnedRouterConfig, RouterInputs, build_router

TEACHERS = ["a", "b"]


def test_aux_loss_is_the_negative_mixture_log_likelihood():
    gen = torch.Generator().manual_seed(0)
    B, T, H = 2, 4, 6
    router = build_router(LearnedRouterConfig(gate="linear"), TEACHERS, H)
    with torch.no_grad():
        router.gate.weight.normal_(generator=gen)
    hidden = torch.randn(B, T, H, generator=gen)
    nll = torch.rand(B, T, 2, generator=gen) * 4
    mask = torch.tensor([[True, True, True, False], [True, False, True, True]])
    inputs = RouterInputs(nll, torch.zeros_like(nll), mask, ["x", "x"], hidden)
    w = router.raw_weights(inputs).detach()
    # Plain reference: -sum_valid log(sum_k w_k * p_k(gold)) with p_k = exp(-NLL_k).
    ref = -sum(
        math.log(float((w[b, t] * torch.exp(-nll[b, t])).sum())) for b, t in mask.nonzero().tolist()
    )
    loss = router.aux_loss(inputs)
    assert loss.requires_grad
    assert abs(loss.item() - ref) < 1e-4


def test_aux_loss_is_finite_when_every_teacher_is_hopeless():
    router = build_router(LearnedRouterConfig(), TEACHERS, 4)
    nll = torch.full((1, 2, 2), 2000.0)  # exp(-2000) underflows; the log-space form must not
    inputs = RouterInputs(nll, nll, torch.ones(1, 2, dtype=torch.bool), ["x"], torch.randn(1, 2, 4))
    loss = router.aux_loss(inputs)
    loss.backward()
    assert abs(loss.item() - 2 * 2000.0) < 1e-2
    assert all(torch.isfinite(p.grad).all() for p in router.parameters())


def _two_kind_batch(
    gen: torch.Generator, centers: torch.Tensor, B: int = 8, T: int = 16
) -> tuple[RouterInputs, torch.Tensor]:
    """Hidden states around two centers [2, H] (token kind 0/1); teacher a is good on kind 0, b on kind 1."""
    H = centers.shape[1]
    kind = torch.randint(0, 2, (B, T), generator=gen)
    hidden = centers[kind] + 0.3 * torch.randn(B, T, H, generator=gen)
    good, bad = 0.5, 4.0
    nll = torch.stack(
        [torch.where(kind == 0, good, bad), torch.where(kind == 1, good, bad)], dim=-1
    ) + 0.1 * torch.rand(B, T, 2, generator=gen)
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[:, -2:] = False
    nll = torch.where(mask.unsqueeze(-1), nll, torch.zeros_like(nll))
    return RouterInputs(nll, torch.zeros_like(nll), mask, ["x"] * B, hidden), kind


def test_gate_learns_to_route_by_token_kind(one_thread):
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    centers = torch.randn(2, 12, generator=gen) * 2
    for gate in ("linear", "mlp"):
        config = LearnedRouterConfig(gate=gate, hidden=16, lr=1e-2)
        router = build_router(config, TEACHERS, 12)
        assert router.needs_hidden
        optimizer = torch.optim.Adam(router.parameters(), lr=config.lr)
        for _ in range(200):
            inputs, _ = _two_kind_batch(gen, centers)
            loss = router.aux_loss(inputs) / inputs.mask.sum()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        test_inputs, kind = _two_kind_batch(gen, centers)
        w = router(test_inputs)
        valid = test_inputs.mask
        on_a = w[valid & (kind == 0)][:, 0].mean().item()
        on_b = w[valid & (kind == 1)][:, 1].mean().item()
        assert on_a > 0.8 and on_b > 0.8, (gate, on_a, on_b)
