"""Pinned numbers: both loss drivers on one small hand-written input, against expected values
written here as literals.

The other loss tests compare the drivers with references that share code with them (the dense
blend, the registered divergences), so a change to a formula could pass them all. These numbers
cannot follow such a change. They were computed once by a separate script in plain Python
`math` (no torch, no merge_distill code), token by token, from the documented formulas, and
agreed with both drivers to ~2e-15 (float64) before being pasted here (13 significant digits):

  Teacher j at temperature T: p_j = softmax(teacher_logits_j / T); student q = softmax(s / T).
  Blend (weights w_j of the position):
    mixture    p(v) = sum_j w_j p_j(v)
    geometric  p(v) = exp(sum_j w_j log p_j(v)) / sum_v' exp(sum_j w_j log p_j(v'))
  Divergence D(p, q) (p = blended target, q = student), KL(a || b) = sum_v a log(a / b):
    forward_kl  KL(p || q)
    reverse_kl  KL(q || p)
    jsd         beta = 0.3, m = beta p + (1 - beta) q:
                [beta KL(p || m) + (1 - beta) KL(q || m)] / (beta (1 - beta))
    skew_kl     alpha = 0.2: KL(p || alpha p + (1 - alpha) q)
    tvd         0.5 sum_v |p(v) - q(v)|
  divergence_sum     = T^2 * sum over positions with a target of D(p, q)
  target_entropy_sum = sum over those positions of -sum_v p log p   (no T^2)
  ce_sum             = sum over those positions of -log softmax(s)[gold]   (temperature 1)
  (The drivers return these sums separately; hard_label_weight is combined by the engine.)

Sparse driver (losses/sparse.py, docs/CACHE.md), from each teacher's exact top-k at T
(S_j = its k most likely ids, tail_j = sum of p_j outside S_j):
  buckets: U = union of the S_j (one bucket per token) + rest = the V - |U| other tokens
  (no rest bucket when |U| = V). Teacher j per token: p_j(v) on S_j, tail_j / (V - k) on
  every other token. Blend per token as above; the rest bucket gets (V - |U|) times its
  per-token blend value; then normalise over the buckets. Student: q(u) on U and
  q(rest) = sum of q over the rest tokens. D, T^2 and the sums as above, on buckets
  (the entropy is that of the bucket distribution).
  With k = V every bucket is one token, so the expected values are the dense ones.

Input: B = 1, 4 positions, V = 5, K = 2 teachers given as unnormalised logits, position 1 has
no target (its weights are non-zero: the driver must still ignore it). At k = 2 the three
scored positions have unions of 3, 2 and 4 ids (overlapping, equal and disjoint top-2 sets);
at k = 3 of 4, 4 and 5 (the last leaves no rest bucket).
"""

from __future__ import annotations

import math

import pytest
import torch

from merge_distill.losses import DIVERGENCES, distill_loss
from merge_distill.losses.sparse import sparse_distill_loss

# ---------------------------------------------------------------------------------------------
# Expected values (see the module docstring for how each was derived).

# divergence_sum, keyed by (driver, kind, blend, temperature); "sparse_kK" = sparse driver at top-K.
EXPECTED_DIVERGENCE: dict[tuple[str, str, str, float], float] = {
    ("dense", "forward_kl", "mixture", 1.0): 2.206888355124,
    ("dense", "forward_kl", "mixture", 2.0): 2.601228855516,
    ("dense", "forward_kl", "geometric", 1.0): 2.155819339665,
    ("dense", "forward_kl", "geometric", 2.0): 2.587958350146,
    ("dense", "reverse_kl", "mixture", 1.0): 2.544468071963,
    ("dense", "reverse_kl", "mixture", 2.0): 2.751449769757,
    ("dense", "reverse_kl", "geometric", 1.0): 2.243616592942,
    ("dense", "reverse_kl", "geometric", 2.0): 2.633931974914,
    ("dense", "jsd", "mixture", 1.0): 2.006222645451,
    ("dense", "jsd", "mixture", 2.0): 2.537715845176,
    ("dense", "jsd", "geometric", 1.0): 1.852456830899,
    ("dense", "jsd", "geometric", 2.0): 2.487839277388,
    ("dense", "skew_kl", "mixture", 1.0): 1.251348686722,
    ("dense", "skew_kl", "mixture", 2.0): 1.611674501703,
    ("dense", "skew_kl", "geometric", 1.0): 1.137027861193,
    ("dense", "skew_kl", "geometric", 2.0): 1.572308884078,
    ("dense", "tvd", "mixture", 1.0): 1.462943510342,
    ("dense", "tvd", "mixture", 2.0): 3.165503776945,
    ("dense", "tvd", "geometric", 1.0): 1.355675696728,
    ("dense", "tvd", "geometric", 2.0): 3.031907543988,
    ("sparse_k2", "forward_kl", "mixture", 1.0): 2.158084914857,
    ("sparse_k2", "forward_kl", "mixture", 2.0): 2.442840835991,
    ("sparse_k2", "forward_kl", "geometric", 1.0): 2.121624450989,
    ("sparse_k2", "forward_kl", "geometric", 2.0): 2.386673869578,
    ("sparse_k2", "reverse_kl", "mixture", 1.0): 2.299150294216,
    ("sparse_k2", "reverse_kl", "mixture", 2.0): 2.464709287952,
    ("sparse_k2", "reverse_kl", "geometric", 1.0): 1.980398216721,
    ("sparse_k2", "reverse_kl", "geometric", 2.0): 2.305752368984,
    ("sparse_k2", "jsd", "mixture", 1.0): 1.944064992571,
    ("sparse_k2", "jsd", "mixture", 2.0): 2.361385233199,
    ("sparse_k2", "jsd", "geometric", 1.0): 1.809375666447,
    ("sparse_k2", "jsd", "geometric", 2.0): 2.272449867955,
    ("sparse_k2", "skew_kl", "mixture", 1.0): 1.208839052687,
    ("sparse_k2", "skew_kl", "mixture", 2.0): 1.495060279917,
    ("sparse_k2", "skew_kl", "geometric", 1.0): 1.107523675112,
    ("sparse_k2", "skew_kl", "geometric", 2.0): 1.431509847866,
    ("sparse_k2", "tvd", "mixture", 1.0): 1.449767075023,
    ("sparse_k2", "tvd", "mixture", 2.0): 3.092351800733,
    ("sparse_k2", "tvd", "geometric", 1.0): 1.374342038865,
    ("sparse_k2", "tvd", "geometric", 2.0): 2.972006683997,
    ("sparse_k3", "forward_kl", "mixture", 1.0): 2.194982933058,
    ("sparse_k3", "forward_kl", "mixture", 2.0): 2.555263972411,
    ("sparse_k3", "forward_kl", "geometric", 1.0): 2.141919255812,
    ("sparse_k3", "forward_kl", "geometric", 2.0): 2.514170273362,
    ("sparse_k3", "reverse_kl", "mixture", 1.0): 2.568638885028,
    ("sparse_k3", "reverse_kl", "mixture", 2.0): 2.72003098256,
    ("sparse_k3", "reverse_kl", "geometric", 1.0): 2.187154429243,
    ("sparse_k3", "reverse_kl", "geometric", 2.0): 2.548560613617,
    ("sparse_k3", "jsd", "mixture", 1.0): 1.995487004469,
    ("sparse_k3", "jsd", "mixture", 2.0): 2.492931752451,
    ("sparse_k3", "jsd", "geometric", 1.0): 1.829014802093,
    ("sparse_k3", "jsd", "geometric", 2.0): 2.411354619051,
    ("sparse_k3", "skew_kl", "mixture", 1.0): 1.244706968858,
    ("sparse_k3", "skew_kl", "mixture", 2.0): 1.583247440173,
    ("sparse_k3", "skew_kl", "geometric", 1.0): 1.12070807497,
    ("sparse_k3", "skew_kl", "geometric", 2.0): 1.522815509307,
    ("sparse_k3", "tvd", "mixture", 1.0): 1.458244372539,
    ("sparse_k3", "tvd", "mixture", 2.0): 3.135083556114,
    ("sparse_k3", "tvd", "geometric", 1.0): 1.351839734838,
    ("sparse_k3", "tvd", "geometric", 2.0): 2.993526929662,
}

# target_entropy_sum: it depends on the blend and temperature only, not on the divergence.
EXPECTED_ENTROPY: dict[tuple[str, str, float], float] = {
    ("dense", "mixture", 1.0): 3.64488062341,
    ("dense", "mixture", 2.0): 4.384044832229,
    ("dense", "geometric", 1.0): 3.662921208401,
    ("dense", "geometric", 2.0): 4.391490004673,
    ("sparse_k2", "mixture", 1.0): 3.502819930378,
    ("sparse_k2", "mixture", 2.0): 3.97544503635,
    ("sparse_k2", "geometric", 1.0): 3.548935104141,
    ("sparse_k2", "geometric", 2.0): 3.989378942568,
    ("sparse_k3", "mixture", 1.0): 3.660151193665,
    ("sparse_k3", "mixture", 2.0): 4.403851134579,
    ("sparse_k3", "geometric", 1.0): 3.677118035912,
    ("sparse_k3", "geometric", 2.0): 4.41411943074,
}

# ce_sum: -log softmax(student)[gold] at temperature 1, summed over positions 0, 2 and 3.
EXPECTED_CE = 2.796324019932
EXPECTED_N_TOKENS = 3

# ---------------------------------------------------------------------------------------------
# The fixed input (the reference script used exactly these literals).

STUDENT_LOGITS = [
    [0.5, -1.0, 2.0, 0.0, 1.0],
    [1.0, 1.0, 0.0, -2.0, 0.5],  # no target
    [-0.5, 1.5, 0.3, -1.2, 0.8],
    [2.2, -0.7, 0.1, 1.1, -1.5],
]
TEACHER_LOGITS = [
    [  # teacher 0: top-2 {0, 1}, -, {1, 4}, {2, 1}
        [3.0, 2.5, 0.5, 1.0, -0.5],
        [0.0, 0.5, 1.0, 1.5, 2.0],
        [1.0, 4.0, 0.0, -1.0, 3.2],
        [0.3, 1.8, 2.4, -0.6, 0.0],
    ],
    [  # teacher 1: top-2 {1, 3}, -, {4, 1}, {3, 0}
        [0.2, 2.8, -1.0, 2.0, 0.6],
        [1.2, -0.4, 0.9, 0.0, 0.3],
        [-0.3, 2.0, 0.4, -2.0, 2.6],
        [2.1, -1.1, 0.0, 3.3, 0.9],
    ],
]
WEIGHTS = [[0.7, 0.3], [0.5, 0.5], [0.25, 0.75], [0.4, 0.6]]  # [position, teacher]; rows sum to 1
TARGETS = [2, -100, 1, 3]
V = 5

KINDS: dict[str, dict[str, float]] = {
    "forward_kl": {}, "reverse_kl": {}, "jsd": {"beta": 0.3}, "skew_kl": {"alpha": 0.2}, "tvd": {},
}
BLENDS = ["mixture", "geometric"]
TEMPERATURES = [1.0, 2.0]
REL = {torch.float64: 1e-9, torch.float32: 1e-5}  # the literals carry 13 significant digits


Batch = tuple[torch.Tensor, list[torch.Tensor], torch.Tensor, torch.Tensor]


def inputs(dtype: torch.dtype, requires_grad: bool = False) -> Batch:
    """(student [1, 4, V], teachers K x [1, 4, V], weights [1, 4, K], targets [1, 4])."""
    student = torch.tensor([STUDENT_LOGITS], dtype=dtype, requires_grad=requires_grad)
    teachers = [torch.tensor([logits], dtype=dtype) for logits in TEACHER_LOGITS]
    return student, teachers, torch.tensor([WEIGHTS], dtype=dtype), torch.tensor([TARGETS])


def exact_top_k(teachers: list[torch.Tensor], k: int, temperature: float):
    """What the cache stores, computed exactly in float64: top-k ids, their log-probs at T, and
    the log of the mass on the other V - k tokens (-inf when k = V)."""
    ids, values, tails = [], [], []
    for logits in teachers:
        logprobs = torch.log_softmax(logits.double() / temperature, dim=-1)
        top_values, top_ids = logprobs.topk(k, dim=-1)
        ids.append(top_ids)
        values.append(top_values)
        tails.append(torch.logsumexp(logprobs.scatter(-1, top_ids, -math.inf), dim=-1))
    return ids, values, tails


def config(kind: str, temperature: float):
    return DIVERGENCES.get(kind).config_cls(temperature=temperature, **KINDS[kind])


def check(out, divergence: float, entropy: float, dtype: torch.dtype) -> None:
    rel = REL[dtype]
    assert out.n_tokens == EXPECTED_N_TOKENS
    assert float(out.divergence_sum.detach()) == pytest.approx(divergence, rel=rel)
    assert float(out.ce_sum.detach()) == pytest.approx(EXPECTED_CE, rel=rel)
    assert out.target_entropy_sum == pytest.approx(entropy, rel=rel)


def test_the_table_covers_every_case() -> None:
    """Every registered divergence is pinned, for every driver, blend and temperature."""
    assert set(KINDS) == set(DIVERGENCES.names())
    expected = {(d, kind, blend, t) for d in ("dense", "sparse_k2", "sparse_k3") for kind in KINDS
                for blend in BLENDS for t in TEMPERATURES}
    assert set(EXPECTED_DIVERGENCE) == expected
    assert set(EXPECTED_ENTROPY) == {(d, blend, t) for d, _, blend, t in expected}


def test_the_input_has_the_intended_unions() -> None:
    """The fixed input exercises what the docstring says: at k = 2 unions of 3, 2 and 4 ids
    (overlapping, equal, disjoint top-k sets), at k = 3 of 4, 4 and 5 (no rest bucket)."""
    _, teachers, _, _ = inputs(torch.float64)
    for k, sizes in ((2, [3, 2, 4]), (3, [4, 4, 5])):
        ids, _, _ = exact_top_k(teachers, k, 1.0)
        unions = [len({int(i) for j in range(2) for i in ids[j][0, t]}) for t in (0, 2, 3)]
        assert unions == sizes


@pytest.mark.parametrize("temperature", TEMPERATURES)
@pytest.mark.parametrize("blend", BLENDS)
@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_dense_driver(kind: str, blend: str, temperature: float, dtype: torch.dtype) -> None:
    """distill_loss on teacher logits. float64 with a gradient (the in-place path, chunks of 2
    rows); float32 without one (gathered valid rows, one chunk)."""
    grad = dtype == torch.float64
    student, teachers, weights, targets = inputs(dtype, requires_grad=grad)
    out = distill_loss(student, teachers, weights, targets, DIVERGENCES.get(kind).impl, config(kind, temperature),
                       blend=blend, chunk_tokens=2 if grad else 1024)
    check(out, EXPECTED_DIVERGENCE[("dense", kind, blend, temperature)],
          EXPECTED_ENTROPY[("dense", blend, temperature)], dtype)


@pytest.mark.parametrize("temperature", TEMPERATURES)
@pytest.mark.parametrize("blend", BLENDS)
@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("k", [2, 3, V])
def test_sparse_driver(kind: str, blend: str, temperature: float, k: int) -> None:
    """sparse_distill_loss on exact float64 top-k targets; at k = V it must give the dense numbers."""
    student, teachers, weights, targets = inputs(torch.float64, requires_grad=True)
    ids, values, tails = exact_top_k(teachers, k, temperature)
    out = sparse_distill_loss(student, ids, values, tails, weights, targets, DIVERGENCES.get(kind).impl,
                              config(kind, temperature), blend=blend, chunk_tokens=2)
    driver = "dense" if k == V else f"sparse_k{k}"
    check(out, EXPECTED_DIVERGENCE[(driver, kind, blend, temperature)],
          EXPECTED_ENTROPY[(driver, blend, temperature)], torch.float64)


@pytest.mark.parametrize("blend", BLENDS)
@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("k", [2, 3])
def test_sparse_driver_fed_by_the_cache_writer(kind: str, blend: str, k: int) -> None:
    """The same numbers through the cache's own `teacher_targets` (float32 values and tails at
    T = 2, as stored) and a float32 student: writer and sparse driver agree on the conventions."""
    from merge_distill.cache.writer import teacher_targets  # here: the driver pins need no cache package

    temperature = 2.0
    student, teachers, weights, targets = inputs(torch.float32)
    cached = [teacher_targets(logits, targets, k, temperature, chunk_tokens=3) for logits in teachers]
    out = sparse_distill_loss(student, [c["ids"] for c in cached], [c["values"] for c in cached],
                              [c["tail"] for c in cached], weights, targets, DIVERGENCES.get(kind).impl,
                              config(kind, temperature), blend=blend)
    check(out, EXPECTED_DIVERGENCE[(f"sparse_k{k}", kind, blend, temperature)],
          EXPECTED_ENTROPY[(f"sparse_k{k}", blend, temperature)], torch.float32)
