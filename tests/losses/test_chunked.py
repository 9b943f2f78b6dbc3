"""The chunked driver against the dense reference (loss, gradients, entropy), and against
explicit formulas for temperature and cross-entropy; masking, pure CE, extremes, dtypes."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from merge_distill.losses import DIVERGENCES, DistillOutput, distill_loss, distill_loss_dense
from merge_distill.losses.base import LossConfigBase

B, T, V, K = 3, 7, 11, 3
CONFIGS: list[tuple[str, dict[str, float]]] = [
    ("forward_kl", {}), ("reverse_kl", {}), ("jsd", {"beta": 0.3}), ("jsd", {"beta": 1.0}),
    ("skew_kl", {"alpha": 0.1}), ("tvd", {}),
]


def make_batch(dtype: torch.dtype = torch.float64, k: int = K, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    student = (2.0 * torch.randn(B, T, V, generator=g, dtype=torch.float64)).to(dtype).requires_grad_()
    teachers = [(2.0 * torch.randn(B, T, V, generator=g, dtype=torch.float64)).to(dtype) for _ in range(k)]
    targets = torch.randint(0, V, (B, T), generator=g)
    targets[0, -2:] = -100  # a padded tail
    targets[1] = -100  # a row with no target at all
    targets[2, 0] = -100
    weights = torch.softmax(torch.randn(B, T, k, generator=g, dtype=torch.float64), -1).to(dtype)
    weights[targets == -100] = 0.0
    return dict(student_logits=student, teacher_logits=teachers, weights=weights, targets=targets)


def config_for(name: str, params: dict[str, float], **base: float) -> LossConfigBase:
    return DIVERGENCES.get(name).config_cls(**params, **base)


def loss_and_grad(fn, batch: dict, name: str, config: LossConfigBase, **kw) -> tuple[DistillOutput, torch.Tensor]:
    out = fn(divergence=DIVERGENCES.get(name).impl, config=config, **batch, **kw)
    total = 0.7 * out.divergence_sum + 0.3 * out.ce_sum
    (grad,) = torch.autograd.grad(total, batch["student_logits"])
    return out, grad


@pytest.mark.parametrize("name,params", CONFIGS)
@pytest.mark.parametrize("blend", ["mixture", "geometric"])
@pytest.mark.parametrize("chunk_tokens", [1, 4, 1024])
def test_chunked_equals_dense(name: str, params: dict[str, float], blend: str, chunk_tokens: int) -> None:
    batch = make_batch()
    config = config_for(name, params, temperature=1.7)
    ours, our_grad = loss_and_grad(distill_loss, batch, name, config, blend=blend, chunk_tokens=chunk_tokens)
    ref, ref_grad = loss_and_grad(distill_loss_dense, batch, name, config, blend=blend)
    assert ours.n_tokens == ref.n_tokens == 11  # 21 positions - 2 - 7 - 1 masked
    torch.testing.assert_close(ours.divergence_sum, ref.divergence_sum, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ours.ce_sum, ref.ce_sum, rtol=1e-12, atol=1e-12)
    assert ours.target_entropy_sum == pytest.approx(ref.target_entropy_sum, rel=1e-12)
    torch.testing.assert_close(our_grad, ref_grad, rtol=1e-10, atol=1e-12)
    assert (our_grad[batch["targets"] == -100] == 0).all()  # masked positions get no gradient


def test_temperature_and_cross_entropy_match_explicit_formulas() -> None:
    """divergence_sum = T^2 * sum_valid KL(sum_k w_k softmax(t_k/T) || softmax(s/T)); CE at T = 1."""
    batch = make_batch(seed=1)
    temperature = 2.5
    out = distill_loss(divergence=DIVERGENCES.get("forward_kl").impl,
                       config=config_for("forward_kl", {}, temperature=temperature), chunk_tokens=3, **batch)
    s = batch["student_logits"].detach().numpy()
    targets = batch["targets"].numpy()
    w = batch["weights"].numpy()

    def softmax(x: np.ndarray) -> np.ndarray:
        e = np.exp(x - x.max())
        return e / e.sum()

    kl_sum = ce_sum = entropy_sum = 0.0
    for b in range(B):
        for t in range(T):
            if targets[b, t] == -100:
                continue
            p = sum(w[b, t, k] * softmax(batch["teacher_logits"][k][b, t].numpy() / temperature) for k in range(K))
            q = softmax(s[b, t] / temperature)
            kl_sum += float((p * np.log(p / q)).sum())
            entropy_sum += float(-(p * np.log(p)).sum())
            ce_sum += float(-np.log(softmax(s[b, t])[targets[b, t]]))
    assert out.divergence_sum.item() == pytest.approx(temperature**2 * kl_sum, rel=1e-12)
    assert out.ce_sum.item() == pytest.approx(ce_sum, rel=1e-12)
    assert out.target_entropy_sum == pytest.approx(entropy_sum, rel=1e-12)
    expected_ce = F.cross_entropy(batch["student_logits"].reshape(-1, V), batch["targets"].reshape(-1), reduction="sum")
    torch.testing.assert_close(out.ce_sum, expected_ce)


@pytest.mark.parametrize("fn", [distill_loss, distill_loss_dense])
def test_fully_masked_batch_gives_zeros_not_nan(fn) -> None:
    batch = make_batch()
    batch["targets"] = torch.full((B, T), -100)
    batch["weights"] = torch.zeros(B, T, K, dtype=torch.float64)
    out, grad = loss_and_grad(fn, batch, "jsd", config_for("jsd", {"beta": 0.5}))
    assert out.n_tokens == 0 and out.target_entropy_sum == 0.0
    assert out.divergence_sum.item() == 0.0 and out.ce_sum.item() == 0.0
    assert torch.equal(grad, torch.zeros_like(grad))


def test_valid_rows_without_teacher_weight_carry_no_divergence() -> None:
    batch = make_batch()
    config = config_for("reverse_kl", {})
    full = distill_loss(divergence=DIVERGENCES.get("reverse_kl").impl, config=config, **batch)
    batch["weights"] = batch["weights"].clone()
    batch["weights"][0, 0] = 0.0  # a valid position nobody weighs
    out, grad = loss_and_grad(distill_loss, batch, "reverse_kl", config)
    ref, ref_grad = loss_and_grad(distill_loss_dense, batch, "reverse_kl", config)
    assert torch.isfinite(out.divergence_sum) and out.divergence_sum.item() < full.divergence_sum.item()
    torch.testing.assert_close(out.divergence_sum, ref.divergence_sum)
    torch.testing.assert_close(grad, ref_grad)


def test_pure_cross_entropy_without_teachers() -> None:
    batch = make_batch(k=0)
    config = config_for("forward_kl", {}, hard_label_weight=1.0)
    out, grad = loss_and_grad(distill_loss, batch, "forward_kl", config, chunk_tokens=4)
    assert out.divergence_sum.item() == 0.0 and out.target_entropy_sum == 0.0
    logits = batch["student_logits"]
    expected = F.cross_entropy(logits.reshape(-1, V), batch["targets"].reshape(-1), reduction="sum")
    (expected_grad,) = torch.autograd.grad(0.3 * expected, logits)
    torch.testing.assert_close(out.ce_sum, expected)
    torch.testing.assert_close(grad, expected_grad)
    with pytest.raises(ValueError, match="hard_label_weight is 0.5"):
        distill_loss(divergence=DIVERGENCES.get("forward_kl").impl,
                     config=config_for("forward_kl", {}, hard_label_weight=0.5), **batch)


def test_compute_ce_false_and_single_output_backward() -> None:
    batch = make_batch()
    config = config_for("tvd", {})
    out = distill_loss(divergence=DIVERGENCES.get("tvd").impl, config=config, compute_ce=False, chunk_tokens=5, **batch)
    assert out.ce_sum.item() == 0.0
    out.divergence_sum.backward()  # only one of the two outputs is used
    ref = distill_loss_dense(divergence=DIVERGENCES.get("tvd").impl, config=config, compute_ce=False, **batch)
    (ref_grad,) = torch.autograd.grad(ref.divergence_sum, batch["student_logits"])
    torch.testing.assert_close(batch["student_logits"].grad, ref_grad)


@pytest.mark.parametrize("name,params", CONFIGS)
@pytest.mark.parametrize("blend", ["mixture", "geometric"])
def test_zero_probability_teachers_and_extreme_logits(name: str, params: dict[str, float], blend: str) -> None:
    batch = make_batch(dtype=torch.float32, seed=2)
    with torch.no_grad():
        batch["teacher_logits"][0][:, :, :3] = float("-inf")  # teacher 0 rules out tokens 0..2
        batch["teacher_logits"][1][0, 0] = torch.tensor([1e4, -1e4] + [0.0] * (V - 2))
        batch["student_logits"][2, 1] = torch.tensor([-1e4, 1e4] + [-1e4] * (V - 2))
        batch["student_logits"][0, 0, 5] = 1e4
    config = config_for(name, params, temperature=2.0)
    ours, grad = loss_and_grad(distill_loss, batch, name, config, blend=blend, chunk_tokens=4)
    ref, ref_grad = loss_and_grad(distill_loss_dense, batch, name, config, blend=blend)
    assert torch.isfinite(ours.divergence_sum) and torch.isfinite(ours.ce_sum)
    assert np.isfinite(ours.target_entropy_sum)
    assert torch.isfinite(grad).all()
    # float32 with logit gaps of 1e4: a log-prob of magnitude ~5e3 carries ~2e-4 of rounding,
    # which a KL term multiplies by ~5e3, so chunked and dense agree to ~1e-5 relative only.
    torch.testing.assert_close(ours.divergence_sum, ref.divergence_sum, rtol=1e-4, atol=1e-3)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-4, atol=1e-3)


def test_bfloat16_inputs_follow_the_float32_result() -> None:
    batch = make_batch(dtype=torch.bfloat16, seed=3)
    config = config_for("jsd", {"beta": 0.5})
    out, grad = loss_and_grad(distill_loss, batch, "jsd", config, chunk_tokens=4)
    assert out.divergence_sum.dtype == torch.float32 and grad.dtype == torch.bfloat16
    as32 = {k: v for k, v in batch.items()}
    as32["student_logits"] = batch["student_logits"].detach().float().requires_grad_()
    as32["teacher_logits"] = [t.float() for t in batch["teacher_logits"]]
    ref, ref_grad = loss_and_grad(distill_loss_dense, as32, "jsd", config)
    torch.testing.assert_close(out.divergence_sum, ref.divergence_sum, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad.float(), ref_grad, rtol=2e-2, atol=2e-3)


def test_no_grad_evaluation_and_single_backward() -> None:
    batch = make_batch()
    config = config_for("forward_kl", {})
    fn = DIVERGENCES.get("forward_kl").impl
    with torch.no_grad():
        evaluated = distill_loss(divergence=fn, config=config, **batch)
    assert not evaluated.divergence_sum.requires_grad
    ref = distill_loss_dense(divergence=fn, config=config, **batch)
    torch.testing.assert_close(evaluated.divergence_sum, ref.divergence_sum.detach())
    out = distill_loss(divergence=fn, config=config, **batch)
    (out.divergence_sum + out.ce_sum).backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="only once"):
        (out.divergence_sum + out.ce_sum).backward()


def test_shape_errors_name_the_problem() -> None:
    batch = make_batch()
    fn, config = DIVERGENCES.get("forward_kl").impl, config_for("forward_kl", {})
    bad = dict(batch, teacher_logits=[batch["teacher_logits"][0][..., :-1]] + batch["teacher_logits"][1:])
    with pytest.raises(ValueError, match=r"teacher_logits\[0\] has shape"):
        distill_loss(divergence=fn, config=config, **bad)
    with pytest.raises(ValueError, match=r"expected \[B, T, K\]"):
        distill_loss(divergence=fn, config=config, **dict(batch, weights=batch["weights"][..., :2]))
    with pytest.raises(ValueError, match="token ids in"):
        distill_loss(divergence=fn, config=config, **dict(batch, targets=torch.full((B, T), V)))


def test_vocab_sliced_logits_are_read_in_place() -> None:
    """The engine passes logits[..., :V] views of padded-vocabulary outputs (non-contiguous)."""
    batch = make_batch(seed=4)
    padded_student = torch.cat([batch["student_logits"].detach(), torch.full((B, T, 3), 50.0, dtype=torch.float64)], -1)
    padded_student.requires_grad_()
    sliced = dict(batch, student_logits=padded_student[..., :V],
                  teacher_logits=[torch.cat([t, torch.zeros(B, T, 3, dtype=t.dtype)], -1)[..., :V] for t in batch["teacher_logits"]])
    assert not sliced["student_logits"].is_contiguous()
    config = config_for("skew_kl", {"alpha": 0.2}, temperature=1.3)
    fn = DIVERGENCES.get("skew_kl").impl
    ours = distill_loss(divergence=fn, config=config, chunk_tokens=3, **sliced)
    (0.7 * ours.divergence_sum + 0.3 * ours.ce_sum).backward()
    ref, ref_grad = loss_and_grad(distill_loss_dense, batch, "skew_kl", config)
    torch.testing.assert_close(ours.divergence_sum, ref.divergence_sum)
    torch.testing.assert_close(padded_student.grad[..., :V], ref_grad)
    assert (padded_student.grad[..., V:] == 0).all()


@pytest.mark.parametrize("k", [1, 3])
@pytest.mark.parametrize("chunk_tokens", [1, 4, 1024])
@pytest.mark.parametrize("ruled_out", [False, True])
def test_forward_kl_at_t1_from_the_softmax_and_read_only_teachers(k: int, chunk_tokens: int, ruled_out: bool) -> None:
    """Forward KL at T = 1 takes the softmax path (the student's softmax, lse from its maxima), and
    with one normalized teacher at full weight the target is that teacher's own log-probs (read,
    never written) with its entropy taken from `teacher_entropy`. Equal to the dense reference, also
    where a teacher rules tokens out (-inf: the rows are computed again, clamped) and where a valid
    row has no weight."""
    batch = make_batch(k=k, seed=4)
    with torch.no_grad():
        if ruled_out:
            batch["teacher_logits"][0][:, :, :3] = float("-inf")
        if k == 1:
            batch["weights"] = (batch["targets"] != -100).double().unsqueeze(-1)
        logprobs = [torch.log_softmax(t, dim=-1) for t in batch["teacher_logits"]]
    batch["teacher_logits"] = logprobs
    kept = [t.clone() for t in logprobs]
    # the teacher's entropy as its signals give it (0 where there is no target), here in float64
    probs = logprobs[0].exp()
    entropy = torch.where(batch["targets"] != -100, -torch.special.xlogy(probs, probs).sum(-1), 0.0) if k == 1 else None
    config = config_for("forward_kl", {})
    for weights in ([batch["weights"]] if k > 1 else [batch["weights"], batch["weights"].clone().index_put_(
            (torch.tensor([2]), torch.tensor([3])), torch.tensor([0.0], dtype=torch.float64))]):
        batch["weights"] = weights
        ours, grad = loss_and_grad(distill_loss, batch, "forward_kl", config, chunk_tokens=chunk_tokens,
                                   teachers_normalized=True, teacher_entropy=entropy)
        ref, ref_grad = loss_and_grad(distill_loss_dense, batch, "forward_kl", config)
        torch.testing.assert_close(ours.divergence_sum, ref.divergence_sum, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(ours.ce_sum, ref.ce_sum, rtol=1e-12, atol=1e-12)
        assert ours.target_entropy_sum == pytest.approx(ref.target_entropy_sum, rel=1e-12)
        torch.testing.assert_close(grad, ref_grad, rtol=1e-10, atol=1e-12)
        assert (grad[batch["targets"] == -100] == 0).all()
    for before, after in zip(kept, logprobs):
        assert torch.equal(before, after)  # the teachers' log-probs were only read
