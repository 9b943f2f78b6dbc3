"""The sparse (top-k + tail) driver: equal to the dense driver at k = V, equal to a per-token
reference formula of the bucket model below it, correct gradients, no NaN from empty buckets."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from losses.test_chunked import CONFIGS, config_for, loss_and_grad, make_batch
from merge_distill.losses import DIVERGENCES, distill_loss_dense
from merge_distill.align.projection import project_topk
from merge_distill.losses.sparse import sparse_distill_loss


def top_k(teacher_logits: list[torch.Tensor], k: int, temperature: float, dtype: torch.dtype = torch.float64):
    """What the cache stores: top-k log-probs at T (values in `dtype`), ids, log tail mass."""
    ids, values, tails = [], [], []
    for logits in teacher_logits:
        logprobs = torch.log_softmax(logits.double() / temperature, -1)
        v, i = logprobs.topk(k, -1)
        rest = logprobs.scatter(-1, i, -math.inf)
        ids.append(i)
        values.append(v.to(dtype))
        tails.append(torch.logsumexp(rest, -1))
    return ids, values, tails


def sparse_fn(ids, values, tails):
    """sparse_distill_loss with the signature of distill_loss (teacher_logits ignored)."""

    def fn(student_logits, teacher_logits, weights, targets, divergence, config, **kw):
        return sparse_distill_loss(student_logits, ids, values, tails, weights, targets, divergence, config, **kw)

    return fn


@pytest.mark.parametrize("name,params", CONFIGS)
@pytest.mark.parametrize("blend", ["mixture", "geometric"])
@pytest.mark.parametrize("chunk_tokens", [1, 4, 1024])
@pytest.mark.parametrize("sparse_targets", [False, True])
def test_k_equal_vocab_is_the_dense_loss(name: str, params: dict, blend: str, chunk_tokens: int, sparse_targets: bool) -> None:
    """sparse_targets: fewer than half the positions have a target, so the driver gathers the
    valid rows instead of working in place on contiguous rows (both paths are checked)."""
    batch = make_batch()
    if sparse_targets:
        batch["targets"][0] = -100
        batch["weights"][0] = 0.0
    V = batch["student_logits"].shape[-1]
    config = config_for(name, params, temperature=1.7)
    ids, values, tails = top_k(batch["teacher_logits"], V, 1.7)
    ours, our_grad = loss_and_grad(sparse_fn(ids, values, tails), batch, name, config, blend=blend, chunk_tokens=chunk_tokens)
    ref, ref_grad = loss_and_grad(distill_loss_dense, batch, name, config, blend=blend)
    assert ours.n_tokens == ref.n_tokens == (6 if sparse_targets else 11)
    torch.testing.assert_close(ours.divergence_sum, ref.divergence_sum, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ours.ce_sum, ref.ce_sum, rtol=1e-12, atol=1e-12)
    assert ours.target_entropy_sum == pytest.approx(ref.target_entropy_sum, rel=1e-12)
    torch.testing.assert_close(our_grad, ref_grad, rtol=1e-10, atol=1e-12)


def bucket_reference(student, ids, values, tails, weights, targets, temperature, blend) -> tuple[float, float]:
    """Forward KL on buckets, token by token, straight from the formulas of losses/sparse.py.

    Returns (T^2 * sum of KL over valid tokens, sum of the blended target's bucket entropy)."""
    B, T, V = student.shape
    K = len(ids)
    loss = entropy = 0.0
    for b in range(B):
        for t in range(T):
            if targets[b, t] == -100 or weights[b, t].sum() == 0:
                continue
            union = sorted({int(i) for j in range(K) for i, v in zip(ids[j][b, t], values[j][b, t]) if math.isfinite(v)})
            n_rest = V - len(union)
            per_token = []  # each teacher: {token: log p} on U and the per-token log p in rest
            for j in range(K):
                vals = values[j][b, t].double().numpy()
                norm = np.logaddexp.reduce(np.append(vals, float(tails[j][b, t])))
                # an entry with log-prob -inf lists nothing (projection padding repeats a listed id)
                listed = {int(i): v - norm for i, v in zip(ids[j][b, t], vals) if np.isfinite(v)}
                k = len(listed)
                rest = float(tails[j][b, t]) - norm - math.log(V - k) if V > k else -math.inf
                per_token.append(({u: listed.get(u, rest) for u in union}, rest))
            w = weights[b, t].double().numpy()
            if blend == "mixture":
                q = np.array([sum(w[j] * math.exp(per_token[j][0][u]) for j in range(K)) for u in union]
                             + [n_rest * sum(w[j] * math.exp(per_token[j][1]) for j in range(K))])
            else:
                q = np.array([math.exp(sum(w[j] * per_token[j][0][u] for j in range(K))) for u in union]
                             + [n_rest * math.exp(sum(w[j] * per_token[j][1] for j in range(K)))])
            q = q / q.sum()
            s_full = torch.softmax(student[b, t].double() / temperature, -1).numpy()
            s = np.append(s_full[union], s_full.sum() - s_full[union].sum())
            keep = q > 0
            loss += temperature**2 * float((q[keep] * np.log(q[keep] / s[keep])).sum())
            entropy -= float((q[keep] * np.log(q[keep])).sum())
    return loss, entropy


@pytest.mark.parametrize("blend", ["mixture", "geometric"])
@pytest.mark.parametrize("k,teachers", [(1, 1), (3, 1), (2, 3), (4, 3)])
@pytest.mark.parametrize("projected", [False, True])
def test_top_k_matches_the_bucket_formula(blend: str, k: int, teachers: int, projected: bool) -> None:
    """projected: the top-k went through a many-to-one token map (align/projection.py), so the
    entries hold merged repeats and -inf padding that repeats a listed id."""
    batch = make_batch(k=teachers, seed=2)
    temperature = 1.3
    ids, values, tails = top_k(batch["teacher_logits"], k, temperature)
    if projected:
        V = batch["student_logits"].shape[-1]
        mapping = torch.arange(V) % 3  # every teacher token -> one of 3 student tokens
        ids, values, tails = map(list, zip(*(project_topk(i, v, t, mapping) for i, v, t in zip(ids, values, tails))))
        assert k == 1 or any(bool(torch.isinf(v).any()) for v in values)  # entries merged: padding present
    out = sparse_distill_loss(batch["student_logits"], ids, values, tails, batch["weights"], batch["targets"],
                              DIVERGENCES.get("forward_kl").impl, config_for("forward_kl", {}, temperature=temperature),
                              blend=blend, chunk_tokens=4)
    ref_loss, ref_entropy = bucket_reference(batch["student_logits"].detach(), ids, values, tails, batch["weights"],
                                             batch["targets"], temperature, blend)
    assert float(out.divergence_sum.detach()) == pytest.approx(ref_loss, rel=1e-10)
    assert out.target_entropy_sum == pytest.approx(ref_entropy, rel=1e-10)


@pytest.mark.parametrize("name,params", [("forward_kl", {}), ("jsd", {"beta": 0.4}), ("reverse_kl", {})])
@pytest.mark.parametrize("blend", ["mixture", "geometric"])
def test_gradient_matches_finite_differences(name: str, params: dict, blend: str) -> None:
    """The hand-applied chain rule (buckets -> log-probs -> logits) against central finite differences,
    with duplicates in the union (3 teachers, k = 3) and rows whose union covers the vocabulary."""
    g = torch.Generator().manual_seed(5)
    B, T, V, K, k = 2, 3, 6, 3, 3
    teachers = [2.0 * torch.randn(B, T, V, generator=g, dtype=torch.float64) for _ in range(K)]
    ids, values, tails = top_k(teachers, k, 1.5)
    weights = torch.softmax(torch.randn(B, T, K, generator=g, dtype=torch.float64), -1)
    targets = torch.randint(0, V, (B, T), generator=g)
    targets[1, 2] = -100
    config = config_for(name, params, temperature=1.5)
    student = torch.randn(B, T, V, generator=g, dtype=torch.float64, requires_grad=True)

    def loss(x: torch.Tensor) -> torch.Tensor:
        out = sparse_distill_loss(x, ids, values, tails, weights, targets, DIVERGENCES.get(name).impl, config,
                                  blend=blend, chunk_tokens=2)
        return 0.8 * out.divergence_sum + 0.2 * out.ce_sum

    (grad,) = torch.autograd.grad(loss(student), student)  # the outputs backpropagate once only
    numeric = torch.zeros_like(student)
    with torch.no_grad():
        for i in range(student.numel()):
            step = torch.zeros_like(student).view(-1)
            step[i] = 1e-6
            step = step.view_as(student)
            numeric.view(-1)[i] = (loss(student + step) - loss(student - step)) / 2e-6
    torch.testing.assert_close(grad, numeric, rtol=1e-6, atol=1e-8)
    assert (grad[1, 2] == 0).all()  # no target, no gradient


def test_large_k_is_close_to_dense_and_16_bit_values_close_to_32() -> None:
    """Peaked teachers (as trained LMs are): k = V/4 already carries almost all the mass."""
    g = torch.Generator().manual_seed(3)
    B, T, V, K = 2, 8, 64, 3
    teachers = [6.0 * torch.randn(B, T, V, generator=g, dtype=torch.float64) for _ in range(K)]
    student = torch.randn(B, T, V, generator=g, dtype=torch.float64)
    weights = torch.softmax(torch.randn(B, T, K, generator=g, dtype=torch.float64), -1)
    targets = torch.randint(0, V, (B, T), generator=g)
    config = config_for("forward_kl", {})
    kl = DIVERGENCES.get("forward_kl").impl
    dense = distill_loss_dense(student, teachers, weights, targets, kl, config).divergence_sum
    sparse = {dtype: sparse_distill_loss(student, *top_k(teachers, V // 4, 1.0, dtype), weights, targets, kl, config).divergence_sum
              for dtype in (torch.float32, torch.float16)}
    assert float(sparse[torch.float32]) == pytest.approx(float(dense), rel=0.02)
    assert float(sparse[torch.float16]) == pytest.approx(float(sparse[torch.float32]), rel=2e-3)


def test_empty_rest_and_duplicates_give_no_nan() -> None:
    """K * k >= V: the union covers the vocabulary (rest is empty) and ids repeat across teachers."""
    g = torch.Generator().manual_seed(4)
    B, T, V, K = 1, 4, 5, 2
    teachers = [torch.randn(B, T, V, generator=g) for _ in range(K)]
    ids, values, tails = top_k(teachers, 3, 1.0, torch.float32)
    student = torch.randn(B, T, V, generator=g, requires_grad=True)
    weights = torch.full((B, T, K), 0.5)
    targets = torch.zeros(B, T, dtype=torch.long)
    for name, params in CONFIGS:
        out = sparse_distill_loss(student, ids, values, [t.float() for t in tails], weights, targets,
                                  DIVERGENCES.get(name).impl, config_for(name, params))
        (grad,) = torch.autograd.grad(out.divergence_sum, student)
        assert torch.isfinite(out.divergence_sum) and torch.isfinite(grad).all(), name
        assert float(out.divergence_sum.detach()) >= -1e-6, name


def test_shapes_are_checked() -> None:
    batch = make_batch()
    ids, values, tails = top_k(batch["teacher_logits"], 4, 1.0)
    kl, config = DIVERGENCES.get("forward_kl").impl, config_for("forward_kl", {})
    with pytest.raises(ValueError, match="weights have shape"):
        sparse_distill_loss(batch["student_logits"], ids, values, tails, batch["weights"][..., :2], batch["targets"], kl, config)
    with pytest.raises(ValueError, match="tail has shape"):
        sparse_distill_loss(batch["student_logits"], ids, values, [t[:, :3] for t in tails], batch["weights"], batch["targets"], kl, config)


def test_bucket_layout_matches_a_set_union():
    """Buckets = the distinct ids in order of first listing, width = the largest union, empty
    slots repeat the row's first id, and every input slot points at the bucket of its id."""
    from merge_distill.losses.sparse import bucket_layout

    g = torch.Generator().manual_seed(3)
    V, k, c = 12, 4, 50
    # Teachers drawn from overlapping pools, so unions range from 4 to 12 ids.
    topk_ids = [torch.stack([torch.randperm(V, generator=g)[:k] for _ in range(c)]) for _ in range(3)]
    buckets = bucket_layout(topk_ids, V)
    slots = torch.cat(topk_ids, dim=-1)
    unions = [list(dict.fromkeys(row.tolist())) for row in slots]
    width = max(len(u) for u in unions)
    assert buckets.ids.shape == (c, width) and width < 3 * k
    for r, union in enumerate(unions):
        n = len(union)
        assert buckets.ids[r, :n].tolist() == union
        assert buckets.ids[r, n:].tolist() == [union[0]] * (width - n)
        assert buckets.empty[r].tolist() == [False] * n + [True] * (width - n)
        assert buckets.ids[r][buckets.bucket_of_slot[r]].tolist() == slots[r].tolist()
        assert bool(buckets.rest_empty[r]) == (n == V)
        if n < V:
            assert math.isclose(float(buckets.log_rest_count[r]), math.log(V - n))


def test_student_rest_mass_in_every_regime():
    """The student's rest bucket where its mass on U is small (log1p path), large (summed over
    the other tokens) and where those tokens underflow in float32 (logit gap 200): loss and
    gradient in float32 against an autograd float64 reference with log s_rest = logsumexp."""
    g = torch.Generator().manual_seed(11)
    V, k = 8, 2
    teacher = torch.randn(1, 3, V, generator=g, dtype=torch.float64)
    ids, values, tails = top_k([teacher], k, 1.0)
    on_u = torch.zeros(1, 3, V, dtype=torch.float64).scatter_(-1, ids[0], 1.0)
    # Rows: mass on U about 2/8, about 0.99, and 1 - e^-200 (the rest underflows in float32).
    student64 = (0.1 * torch.randn(1, 3, V, generator=g, dtype=torch.float64)
                 + on_u * torch.tensor([0.0, 6.0, 200.0], dtype=torch.float64).view(1, 3, 1))
    weights = torch.ones(1, 3, 1)
    targets = torch.zeros(1, 3, dtype=torch.long)
    config = config_for("forward_kl", {})
    student32 = student64.float().requires_grad_(True)
    out = sparse_distill_loss(student32, ids, [v.float() for v in values], [t.float() for t in tails], weights, targets,
                              DIVERGENCES.get("forward_kl").impl, config)
    (grad,) = torch.autograd.grad(out.divergence_sum, student32)

    z = student64.clone().requires_grad_(True)
    q = torch.cat([values[0], tails[0].unsqueeze(-1)], dim=-1).exp()  # one teacher: exact on the buckets
    log_s_u = torch.log_softmax(z, -1).gather(-1, ids[0])
    log_s_rest = torch.logsumexp(z.masked_fill(on_u.bool(), -math.inf), -1) - torch.logsumexp(z, -1)
    log_s = torch.cat([log_s_u, log_s_rest.unsqueeze(-1)], dim=-1)
    reference = (q * (q.log() - log_s)).sum()
    (ref_grad,) = torch.autograd.grad(reference, z)
    assert float(log_s_rest[0, 2].detach()) < -190  # the third row really is in the underflow regime
    assert float(out.divergence_sum.detach()) == pytest.approx(float(reference.detach()), rel=1e-5)
    torch.testing.assert_close(grad.double(), ref_grad, rtol=1e-4, atol=1e-6)
