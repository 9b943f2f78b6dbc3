"""Every registered divergence against a plain float64 formula written with explicit
probabilities, plus the invariants: endpoints and continuity of JSD, skew at alpha = 0,
non-negativity, zero on equal inputs, and finiteness at probability-0 tokens and extreme logits."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from pydantic import TypeAdapter, ValidationError

from merge_distill.losses import DIVERGENCES
from merge_distill.losses.jsd import JSDConfig
from merge_distill.losses.reverse_kl import LOGPROB_FLOOR
from merge_distill.losses.skew_kl import SkewKLConfig

NAMES = ["forward_kl", "reverse_kl", "jsd", "skew_kl", "tvd"]
PARAMS: list[tuple[str, dict[str, float]]] = [
    ("forward_kl", {}),
    ("reverse_kl", {}),
    ("jsd", {"beta": 0.0}),
    ("jsd", {"beta": 0.1}),
    ("jsd", {"beta": 0.5}),
    ("jsd", {"beta": 0.9}),
    ("jsd", {"beta": 1.0}),
    ("skew_kl", {"alpha": 0.0}),
    ("skew_kl", {"alpha": 0.1}),
    ("skew_kl", {"alpha": 0.7}),
    ("tvd", {}),
]


def run(name: str, student: torch.Tensor, target: torch.Tensor, **params: float) -> torch.Tensor:
    entry = DIVERGENCES.get(name)
    return entry.impl(student, target, entry.config_cls(**params))


def reference(name: str, student_logprobs: np.ndarray, target_logprobs: np.ndarray, **params: float) -> np.ndarray:
    """Per-row divergence from explicit probabilities, term by term, in float64."""
    out = []
    for s_row, t_row in zip(np.exp(student_logprobs), np.exp(target_logprobs)):
        def kl(p: np.ndarray, q: np.ndarray) -> float:
            return sum(pi * math.log(pi / qi) for pi, qi in zip(p, q) if pi > 0)

        if name == "forward_kl":
            out.append(kl(t_row, s_row))
        elif name == "reverse_kl":
            out.append(kl(s_row, t_row))
        elif name == "jsd":
            beta = params["beta"]
            if beta == 0.0:
                out.append(kl(t_row, s_row))
            elif beta == 1.0:
                out.append(kl(s_row, t_row))
            else:
                m = beta * t_row + (1 - beta) * s_row
                out.append((beta * kl(t_row, m) + (1 - beta) * kl(s_row, m)) / (beta * (1 - beta)))
        elif name == "skew_kl":
            alpha = params["alpha"]
            out.append(kl(t_row, alpha * t_row + (1 - alpha) * s_row))
        elif name == "tvd":
            out.append(0.5 * sum(abs(a - b) for a, b in zip(t_row, s_row)))
    return np.array(out)


def random_logprobs(n: int, v: int, scale: float = 1.0, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    student = torch.log_softmax(scale * torch.randn(n, v, generator=g, dtype=torch.float64), -1)
    target = torch.log_softmax(scale * torch.randn(n, v, generator=g, dtype=torch.float64), -1)
    return student, target


@pytest.mark.parametrize("name,params", PARAMS)
def test_matches_explicit_formula(name: str, params: dict[str, float]) -> None:
    student, target = random_logprobs(5, 11, scale=2.0)
    got = run(name, student, target, **params)
    assert got.shape == (5,) and got.dtype == torch.float64
    np.testing.assert_allclose(got.numpy(), reference(name, student.numpy(), target.numpy(), **params), rtol=1e-10, atol=1e-12)
    # float32 inputs give float32 results close to the float64 ones.
    got32 = run(name, student.float(), target.float(), **params)
    assert got32.dtype == torch.float32
    np.testing.assert_allclose(got32.numpy(), got.numpy(), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name,params", PARAMS)
def test_nonnegative_and_zero_on_equal_inputs(name: str, params: dict[str, float]) -> None:
    student, target = random_logprobs(8, 13, scale=3.0, seed=1)
    assert (run(name, student, target, **params) > 0).all()
    assert torch.allclose(run(name, target, target, **params), torch.zeros(8, dtype=torch.float64), atol=1e-12)
    # float32: exactly the same inputs give 0 up to rounding, never a visible negative.
    equal32 = run(name, target.float(), target.float(), **params)
    assert equal32.abs().max() < 1e-6


@pytest.mark.parametrize("name,params", PARAMS)
def test_gradcheck(name: str, params: dict[str, float]) -> None:
    student, target = random_logprobs(3, 5, seed=2)
    logits = student.clone().requires_grad_()

    def fn(x: torch.Tensor) -> torch.Tensor:
        return run(name, torch.log_softmax(x, -1), target, **params)

    assert torch.autograd.gradcheck(fn, (logits,))


def test_jsd_endpoints_equal_forward_and_reverse_kl_exactly() -> None:
    student, target = random_logprobs(6, 17, scale=2.0, seed=3)
    assert torch.equal(run("jsd", student, target, beta=0.0), run("forward_kl", student, target))
    assert torch.equal(run("jsd", student, target, beta=1.0), run("reverse_kl", student, target))


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-3), (torch.float32, 1e-3)])
def test_jsd_is_continuous_at_the_endpoints(dtype: torch.dtype, tol: float) -> None:
    student, target = (x.to(dtype) for x in random_logprobs(6, 50, seed=4))
    fkl, rkl = run("forward_kl", student, target), run("reverse_kl", student, target)
    # The gap to the limit shrinks linearly in beta (and is O(eps) from rounding, not eps/beta).
    for beta, bound in [(1e-2, 100 * tol), (1e-4, tol), (1e-6, tol / 50)]:
        assert (run("jsd", student, target, beta=beta) - fkl).abs().max() < bound
        assert (run("jsd", student, target, beta=1.0 - beta) - rkl).abs().max() < bound


def test_skew_at_alpha_zero_is_forward_kl() -> None:
    student, target = random_logprobs(6, 17, seed=5)
    assert torch.equal(run("skew_kl", student, target, alpha=0.0), run("forward_kl", student, target))
    assert torch.allclose(run("skew_kl", student, target, alpha=1e-7), run("forward_kl", student, target), atol=1e-5)


@pytest.mark.parametrize("name,params", PARAMS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_zero_probability_targets_and_extreme_logits_stay_finite(
    name: str, params: dict[str, float], dtype: torch.dtype
) -> None:
    target_logits = torch.randn(4, 9, dtype=dtype)
    target_logits[0, :4] = float("-inf")  # tokens the target rules out
    target_logits[1] = torch.tensor([1e4, -1e4] + [0.0] * 7, dtype=dtype)
    target_logits[2, 1:] = float("-inf")  # a one-hot target
    student_logits = torch.randn(4, 9, dtype=dtype)
    student_logits[1] = torch.tensor([-1e4, 1e4] + [-1e4] * 7, dtype=dtype)
    student_logits[3, 0] = 1e4
    student_logits.requires_grad_()
    target = torch.log_softmax(target_logits, -1)
    loss = run(name, torch.log_softmax(student_logits, -1), target, **params)
    (grad,) = torch.autograd.grad(loss.sum(), student_logits)
    assert torch.isfinite(loss).all() and (loss >= 0).all()
    assert torch.isfinite(grad).all()


def test_zero_probability_tokens_follow_their_definition() -> None:
    """Where P_target = 0: forward KL and skew ignore the token, JSD (0 < beta < 1) and TVD see
    the student's mass there, reverse KL charges it at the LOGPROB_FLOOR (finite stand-in for inf)."""
    student, target = random_logprobs(3, 7, seed=6)
    target_logits = target.clone()
    target_logits[:, :2] = float("-inf")
    target = torch.log_softmax(target_logits, -1)
    s, t = student.numpy(), target.numpy()
    for name, params in [("forward_kl", {}), ("jsd", {"beta": 0.3}), ("skew_kl", {"alpha": 0.2}), ("tvd", {})]:
        np.testing.assert_allclose(run(name, student, target, **params).numpy(), reference(name, s, t, **params), rtol=1e-10)
    p_s = np.exp(s)
    expected = (p_s * (s - np.maximum(t, LOGPROB_FLOOR))).sum(-1)
    np.testing.assert_allclose(run("reverse_kl", student, target).numpy(), expected, rtol=1e-10)


def test_configs_validate_and_form_a_discriminated_union() -> None:
    assert DIVERGENCES.names() == sorted(NAMES)
    union = TypeAdapter(DIVERGENCES.config_union())
    cfg = union.validate_python({"kind": "jsd", "beta": 0.25, "temperature": 2.0})
    assert isinstance(cfg, JSDConfig) and cfg.beta == 0.25 and cfg.temperature == 2.0
    assert isinstance(union.validate_python({"kind": "skew_kl"}), SkewKLConfig)
    for bad in [{"kind": "jsd", "beta": 1.5}, {"kind": "skew_kl", "alpha": 1.0}, {"kind": "tvd", "beta": 0.5},
                {"kind": "forward_kl", "temperature": 0.0}, {"kind": "nope"}]:
        with pytest.raises(ValidationError):
            union.validate_python(bad)
    for entry in DIVERGENCES.entries():
        assert entry.summary
        for field_name, field in entry.config_cls.model_fields.items():
            assert field.description, f"{entry.name}.{field_name} has no description"
