"""Blends against the plain probability-space formulas, and the online (one teacher at a time)
accumulator against the dense one."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from merge_distill.losses.blend import OnlineBlend, blend_logprobs

K, N, V = 3, 6, 10


def inputs(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    teacher_logprobs = torch.log_softmax(2.0 * torch.randn(K, N, V, generator=g, dtype=torch.float64), -1)
    weights = torch.softmax(torch.randn(N, K, generator=g, dtype=torch.float64), -1)
    weights[1] = torch.tensor([0.0, 1.0, 0.0], dtype=torch.float64)  # a one-hot row
    weights[2] = torch.tensor([0.5, 0.0, 0.5], dtype=torch.float64)  # a teacher switched off
    return teacher_logprobs, weights


def test_mixture_is_the_probability_space_sum() -> None:
    teacher_logprobs, weights = inputs()
    probs = np.exp(teacher_logprobs.numpy())
    expected = np.zeros((N, V))
    for k in range(K):
        expected += weights.numpy()[:, k : k + 1] * probs[k]
    got = blend_logprobs(teacher_logprobs, weights, "mixture")
    np.testing.assert_allclose(np.exp(got.numpy()), expected, rtol=1e-12)
    np.testing.assert_allclose(np.exp(got.numpy()).sum(-1), 1.0, rtol=1e-12)


def test_geometric_is_the_normalised_weighted_product() -> None:
    teacher_logprobs, weights = inputs(1)
    probs = np.exp(teacher_logprobs.numpy())
    unnormalised = np.ones((N, V))
    for k in range(K):
        unnormalised *= probs[k] ** weights.numpy()[:, k : k + 1]
    expected = unnormalised / unnormalised.sum(-1, keepdims=True)
    got = blend_logprobs(teacher_logprobs, weights, "geometric")
    np.testing.assert_allclose(np.exp(got.numpy()), expected, rtol=1e-10)


@pytest.mark.parametrize("mode", ["mixture", "geometric"])
def test_one_hot_weights_reproduce_the_single_teacher(mode: str) -> None:
    teacher_logprobs, _ = inputs(2)
    for k in range(K):
        one_hot = torch.zeros(N, K, dtype=torch.float64)
        one_hot[:, k] = 1.0
        got = blend_logprobs(teacher_logprobs, one_hot, mode)
        torch.testing.assert_close(got, teacher_logprobs[k], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("mode", ["mixture", "geometric"])
def test_zero_probabilities_and_switched_off_teachers(mode: str) -> None:
    teacher_logits = torch.randn(K, N, V, dtype=torch.float64)
    teacher_logits[0, :, :3] = float("-inf")  # teacher 0 rules out tokens 0..2
    teacher_logprobs = torch.log_softmax(teacher_logits, -1)
    weights = torch.tensor([[0.0, 0.5, 0.5]] * (N // 2) + [[0.5, 0.25, 0.25]] * (N - N // 2), dtype=torch.float64)
    got = blend_logprobs(teacher_logprobs, weights, mode)
    assert not torch.isnan(got).any()
    # A teacher with weight 0 has no say: its -inf does not leak into the blend.
    assert torch.isfinite(got[: N // 2]).all()
    if mode == "mixture":
        assert torch.isfinite(got).all()  # other teachers still give those tokens mass
    else:
        assert torch.isneginf(got[N // 2 :, :3]).all()  # a weighted teacher vetoes them
    torch.testing.assert_close(torch.logsumexp(got, -1), torch.zeros(N, dtype=torch.float64))


def test_all_zero_weight_rows_give_no_nan() -> None:
    teacher_logprobs, weights = inputs(3)
    weights[0] = 0.0
    mixture = blend_logprobs(teacher_logprobs, weights, "mixture")
    assert torch.isneginf(mixture[0]).all() and torch.isfinite(mixture[1:]).all()
    geometric = blend_logprobs(teacher_logprobs, weights, "geometric")
    torch.testing.assert_close(geometric[0], torch.full((V,), -np.log(V), dtype=torch.float64))


@pytest.mark.parametrize("mode", ["mixture", "geometric"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_online_blend_equals_dense(mode: str, dtype: torch.dtype) -> None:
    teacher_logits = 3.0 * torch.randn(K, N, V, dtype=dtype)
    teacher_logits[1, 0, :4] = float("-inf")
    teacher_logprobs = torch.log_softmax(teacher_logits, -1)
    _, weights = inputs(4)
    weights = weights.to(dtype)
    online = OnlineBlend(mode, weights)
    for k in range(K):
        online.add(k, teacher_logprobs[k].clone())
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    torch.testing.assert_close(online.result(), blend_logprobs(teacher_logprobs, weights, mode), rtol=tol, atol=tol)


def test_unknown_mode_is_a_clear_error() -> None:
    teacher_logprobs, weights = inputs()
    with pytest.raises(ValueError, match="mixture, geometric"):
        blend_logprobs(teacher_logprobs, weights, "arithmetic")
