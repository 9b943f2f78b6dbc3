"""The log of a distribution's mass outside its top k (signals.tail_logmass): the cache and the
cross-tokenizer source store it, and the sparse loss spreads it over the unlisted tokens."""

from __future__ import annotations

import torch

from merge_distill.signals import tail_logmass


def reference(logits: torch.Tensor, k: int) -> torch.Tensor:
    """float64: log(sum of the probabilities outside the top k), by sorting."""
    p = torch.softmax(logits.double(), -1).sort(-1, descending=True).values
    return p[:, k:].sum(-1).log()


def test_flat_and_peaked_rows_match_float64_and_never_cancel() -> None:
    g = torch.Generator().manual_seed(0)
    V, k = 4096, 64
    flat = torch.randn(6, V, generator=g)                      # top k hold ~13%: the log1p branch
    peaked = torch.randn(6, V, generator=g)
    peaked[:, :1] += torch.tensor([[8.0], [14.0], [20.0], [30.0], [45.0], [60.0]])  # tails down to ~1e-23
    logits = torch.cat([flat, peaked])
    for scores, lse in ((logits.clone(), torch.logsumexp(logits, -1)),                      # raw logits
                        (torch.log_softmax(logits, -1), torch.zeros(len(logits)))):         # log-probs
        values, ids = scores.topk(k, -1)
        ours = tail_logmass(scores.clone(), lse, values, ids).double()
        expected = reference(logits, k)
        # relative accuracy in the tail's probability (not only in its log) on every row
        assert torch.allclose(ours.exp() / expected.exp(), torch.ones_like(expected), rtol=1e-4), (ours, expected)
    assert bool((expected[7:] < -5).all()) and bool((expected[:6] > -0.2).all())  # both branches were taken
