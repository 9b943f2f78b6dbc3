"""BlendStats: what the router did over a run, as plain sums (tensors in, numbers out).

Per teacher k, per domain d, summed over valid tokens t:

    mass[d, k] = sum_t w_tk                         routing mass
    top[d, k]  = sum_t [k has the top weight] / n_t (n_t teachers tied for the top share it)
    nll[d, k]  = sum_t NLL_tk                       gold-token NLL, nats
    ent[d, k]  = sum_t H_tk                         entropy, nats
    aligned[d, k] = sum_t [k covers t]              teachers with another tokenizer cover the
                                                    positions aligned with theirs; others all
    bytes[d, k]   = sum over covered t of the bytes of k's next token (0 when not known)
    tokens[d]  = number of valid tokens

plus the blended target's entropy sum and, on a subsample, pairwise teacher agreement:
top-1 agreement count and the sum of the Jensen-Shannon divergence

    JS(p, q) = 1/2 KL(p || m) + 1/2 KL(q || m),   m = (p + q) / 2     (nats, in [0, log 2]).

Overall values are the sums over domains, so the per-domain split always adds up to them.
All sums are float64 on the CPU; `update` moves one small [B, 6K] tensor per call.

Across processes: domains appear as the data arrives, so each process may have seen a
different set. `all_reduce(group_sum, all_domains)` lays the sums out as one flat float64
tensor in the order of `all_domains` (the union of every process's `domains()`, e.g. from
`accelerate.utils.gather_object`), hands it to `group_sum` (a sum all-reduce, such as
`lambda t: accelerator.reduce(t.to(accelerator.device), "sum").cpu()`), and returns a NEW
BlendStats with the global sums; `self` keeps its local sums, so reporting repeatedly never
double counts. `to_tensor` / `from_tensor` expose that layout; `merge` adds another
BlendStats in place; `state_dict` / `load_state_dict` round-trip the raw sums for resume.
"""

from __future__ import annotations

import math
from itertools import combinations
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import Tensor

# Rows of a domain's [F, K] sums tensor.
_FIELDS = ("mass", "top", "nll", "entropy", "aligned", "bytes")
_MASS, _TOP, _NLL, _ENT, _ALIGNED, _BYTES = range(len(_FIELDS))
F_ROWS = len(_FIELDS)


def _ratio(num: float, den: float) -> float:
    return float(num) / float(den) if den > 0 else 0.0


def pairwise_js(logp_a: Tensor, logp_b: Tensor) -> Tensor:
    """Jensen-Shannon divergence per row, nats. logp_a, logp_b [N, V] log-probs -> [N] float32.

    The log-ratio log p - log m = log 2 - log(1 + q/p) = log 2 - softplus(log q - log p) is
    formed from the difference of the log-probs, never from m itself: it is exactly 0 for
    identical rows and log 2 where q = 0. A term with p(v) == 0 contributes 0 (the limit of
    p log p), selected with torch.where so that 0 * (-inf) or a -inf - (-inf) never becomes NaN.
    """
    log2 = math.log(2.0)
    p, q = logp_a.exp(), logp_b.exp()
    zero = torch.zeros_like(p)
    kl_pm = torch.where(p > 0, p * (log2 - F.softplus(logp_b - logp_a)), zero).sum(-1)
    kl_qm = torch.where(q > 0, q * (log2 - F.softplus(logp_a - logp_b)), zero).sum(-1)
    # Rounding can leave a tiny negative value for identical rows; JS >= 0 exactly.
    return (0.5 * (kl_pm + kl_qm)).clamp_min(0.0)


def agreement_positions(mask: Tensor, max_tokens: int) -> Tensor:
    """Flat indices of up to max_tokens valid positions of mask [B, T], evenly spaced over the
    valid ones (deterministic): where teacher agreement is sampled, online or from the cache."""
    positions = mask.reshape(-1).nonzero().squeeze(-1)  # [n_valid]
    n_valid = positions.numel()
    if max_tokens <= 0:
        return positions[:0]
    if n_valid > max_tokens:
        positions = positions[torch.linspace(0, n_valid - 1, max_tokens, device=positions.device).round().long()]
    return positions


@torch.no_grad()
def logit_agreement(teacher_logits: list[Tensor], mask: Tensor, max_tokens: int = 512,
                    chunk_tokens: int = 64) -> tuple[Tensor, Tensor, int]:
    """Pairwise top-1 agreement and JS divergence on up to max_tokens valid positions.

    teacher_logits: K tensors [B, T, V] (any float dtype, logits or log-probs); mask [B, T] bool.
    Returns (top1 counts [P], JS sums [P], tokens) with pairs in combinations(range(K), 2) order.
    The positions are evenly spaced over the valid ones (deterministic). Log-softmax runs in
    float32 on chunk_tokens rows at a time, so extra memory is about K x chunk_tokens x V floats.
    """
    pairs = list(combinations(range(len(teacher_logits)), 2))
    positions = agreement_positions(mask, max_tokens)
    top1_sum = torch.zeros(len(pairs), dtype=torch.float64, device=positions.device)
    js_sum = torch.zeros_like(top1_sum)
    if not pairs or positions.numel() == 0:
        return top1_sum.cpu(), js_sum.cpu(), 0
    flat = [logits.reshape(-1, logits.shape[-1]) for logits in teacher_logits]
    for start in range(0, positions.numel(), chunk_tokens):
        rows = positions[start : start + chunk_tokens]
        logps = [torch.log_softmax(f.index_select(0, rows).float(), dim=-1) for f in flat]  # K x [n, V]
        argmax = [lp.argmax(-1) for lp in logps]
        for i, (a, b) in enumerate(pairs):
            top1_sum[i] += (argmax[a] == argmax[b]).sum()
            js_sum[i] += pairwise_js(logps[a], logps[b]).double().sum()
    return top1_sum.cpu(), js_sum.cpu(), int(positions.numel())


class BlendStats:
    """Running sums of routing weights and teacher signals over a run. See the module docstring."""

    def __init__(self, teacher_names: list[str]):
        self.teacher_names = list(teacher_names)
        self.pairs: list[tuple[int, int]] = list(combinations(range(len(self.teacher_names)), 2))
        self._domain_tokens: dict[str, int] = {}
        self._domain_sums: dict[str, Tensor] = {}  # domain -> [4, K] float64 (mass, top, nll, ent)
        self._blend_entropy_sum = 0.0
        self._agree_tokens = 0
        self._agree_top1 = torch.zeros(len(self.pairs), dtype=torch.float64)
        self._agree_js = torch.zeros(len(self.pairs), dtype=torch.float64)

    @property
    def num_teachers(self) -> int:
        return len(self.teacher_names)

    def domains(self) -> list[str]:
        """Domains seen so far, sorted."""
        return sorted(self._domain_tokens)

    @torch.no_grad()
    def update(
        self,
        weights: Tensor,
        gold_nll: Tensor,
        entropy: Tensor,
        mask: Tensor,
        domains: list[str],
        target_entropy_sum: float,
        covered: Tensor | None = None,
        next_bytes: Tensor | None = None,
    ) -> None:
        """Add one micro-batch.

        weights, gold_nll, entropy [B, T, K]; mask [B, T] bool (True = valid target);
        domains: tag per row (len B); target_entropy_sum: sum over valid tokens of the blended
        target's entropy (nats); covered [B, T, K] bool (None: every teacher covers every
        position); next_bytes [B, T, K]: bytes of each teacher's next token (None: unknown).
        """
        B, T, K = weights.shape
        if K != self.num_teachers:
            raise ValueError(f"weights have {K} teachers, stats were built for {self.num_teachers}")
        if len(domains) != B:
            raise ValueError(f"got {len(domains)} domain tags for a batch of {B} rows")
        valid = mask.unsqueeze(-1).to(torch.float64)                        # [B, T, 1]
        w = weights.detach().to(torch.float64)
        # Top weight with ties split: every teacher equal to the row max gets 1/n_tied.
        is_top = (w == w.max(dim=-1, keepdim=True).values).to(torch.float64)
        top = is_top / is_top.sum(-1, keepdim=True)
        aligned = covered.to(torch.float64) if covered is not None else torch.ones_like(w)
        nbytes = next_bytes.detach().to(torch.float64) if next_bytes is not None else torch.zeros_like(w)
        per_row = torch.stack(
            [
                (w * valid).sum(1),
                (top * valid).sum(1),
                (gold_nll.detach().to(torch.float64) * valid).sum(1),
                (entropy.detach().to(torch.float64) * valid).sum(1),
                (aligned * valid).sum(1),
                (nbytes * aligned * valid).sum(1),
            ],
            dim=1,
        ).cpu()                                                              # [B, F, K]
        row_tokens = mask.sum(1).cpu().tolist()                              # [B] ints
        for row, domain in enumerate(domains):
            if row_tokens[row] == 0:
                continue  # a fully masked row adds nothing; skipping it keeps empty domains out
            if domain not in self._domain_sums:
                self._domain_sums[domain] = torch.zeros(F_ROWS, K, dtype=torch.float64)
                self._domain_tokens[domain] = 0
            self._domain_sums[domain] += per_row[row]
            self._domain_tokens[domain] += int(row_tokens[row])
        self._blend_entropy_sum += float(target_entropy_sum)

    def add_agreement(self, top1_counts: Tensor, js_sums: Tensor, tokens: int) -> None:
        """Add agreement sums computed elsewhere (e.g. from the teacher cache's top-k):
        top1_counts, js_sums [P] in `self.pairs` order, over `tokens` positions."""
        self._agree_top1 += top1_counts.detach().to("cpu", torch.float64)
        self._agree_js += js_sums.detach().to("cpu", torch.float64)
        self._agree_tokens += int(tokens)

    def summary(self) -> dict[str, Any]:
        """The JSON-serialisable summary the blending report is built from (shape in the docstring)."""

        def teacher_block(sums: Tensor, tokens: int) -> dict[str, dict[str, float]]:
            return {
                name: {
                    "share": _ratio(sums[_MASS, k].item(), tokens),
                    "top_share": _ratio(sums[_TOP, k].item(), tokens),
                    "mean_nll": _ratio(sums[_NLL, k].item(), tokens),
                    "mean_entropy": _ratio(sums[_ENT, k].item(), tokens),
                    "aligned": _ratio(sums[_ALIGNED, k].item(), tokens),
                    "bytes_per_token": (_ratio(sums[_BYTES, k].item(), sums[_ALIGNED, k].item())
                                        if sums[_BYTES, k].item() > 0 else None),
                }
                for k, name in enumerate(self.teacher_names)
            }

        total_tokens = sum(self._domain_tokens.values())
        total = torch.zeros(F_ROWS, self.num_teachers, dtype=torch.float64)
        for sums in self._domain_sums.values():
            total += sums
        agreement = []
        if self._agree_tokens > 0:
            for i, (a, b) in enumerate(self.pairs):
                agreement.append(
                    {
                        "a": self.teacher_names[a],
                        "b": self.teacher_names[b],
                        "top1_agreement": _ratio(self._agree_top1[i].item(), self._agree_tokens),
                        "js": _ratio(self._agree_js[i].item(), self._agree_tokens),
                    }
                )
        return {
            "teachers": list(self.teacher_names),
            "tokens": int(total_tokens),
            "overall": teacher_block(total, total_tokens),
            "per_domain": {
                d: {"tokens": self._domain_tokens[d], "teachers": teacher_block(self._domain_sums[d], self._domain_tokens[d])}
                for d in self.domains()
            },
            "agreement": agreement,
            "blend_entropy": _ratio(self._blend_entropy_sum, total_tokens),
        }

    # ---- persistence and reduction -------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """The raw sums as plain Python values (JSON-serialisable)."""
        return {
            "teachers": list(self.teacher_names),
            "per_domain": {
                d: {"tokens": self._domain_tokens[d], **{f: self._domain_sums[d][i].tolist() for i, f in enumerate(_FIELDS)}}
                for d in self.domains()
            },
            "blend_entropy_sum": self._blend_entropy_sum,
            "agreement": {
                "tokens": self._agree_tokens,
                "top1": self._agree_top1.tolist(),
                "js": self._agree_js.tolist(),
            },
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Replace the sums with those of `state_dict()`; the teachers must match."""
        if list(state["teachers"]) != self.teacher_names:
            raise ValueError(f"stats were saved for teachers {state['teachers']}, this run has {self.teacher_names}")
        self._domain_tokens = {d: int(v["tokens"]) for d, v in state["per_domain"].items()}
        K = self.num_teachers
        # States saved before coverage was counted: every teacher covered every token, bytes unknown.
        default = {"aligned": lambda v: [float(v["tokens"])] * K, "bytes": lambda v: [0.0] * K}
        self._domain_sums = {
            d: torch.tensor([v[f] if f in v else default[f](v) for f in _FIELDS], dtype=torch.float64)
            for d, v in state["per_domain"].items()
        }
        self._blend_entropy_sum = float(state["blend_entropy_sum"])
        self._agree_tokens = int(state["agreement"]["tokens"])
        self._agree_top1 = torch.tensor(state["agreement"]["top1"], dtype=torch.float64)
        self._agree_js = torch.tensor(state["agreement"]["js"], dtype=torch.float64)

    def merge(self, other: "BlendStats") -> None:
        """Add another BlendStats' sums into this one (same teachers)."""
        domains = sorted(set(self.domains()) | set(other.domains()))
        self.from_tensor(self.to_tensor(domains) + other.to_tensor(domains), domains)

    def to_tensor(self, all_domains: list[str]) -> Tensor:
        """Flat float64 [len(all_domains) * (1 + 6K) + 2 + 2P] of the sums (P = K(K-1)/2 pairs).

        Layout: per domain in all_domains order [tokens, mass[K], top[K], nll[K], ent[K], aligned[K], bytes[K]]
        (zeros for a domain not seen here), then blend_entropy_sum, agreement tokens,
        top1[P], js[P]. Every domain seen here must be in all_domains.
        """
        unknown = set(self._domain_tokens) - set(all_domains)
        if unknown:
            raise ValueError(f"all_domains lacks domains seen here: {', '.join(sorted(unknown))}")
        K = self.num_teachers
        parts = []
        for d in all_domains:
            parts.append(torch.tensor([float(self._domain_tokens.get(d, 0))], dtype=torch.float64))
            parts.append(self._domain_sums.get(d, torch.zeros(F_ROWS, K, dtype=torch.float64)).reshape(-1))
        parts.append(torch.tensor([self._blend_entropy_sum, float(self._agree_tokens)], dtype=torch.float64))
        parts += [self._agree_top1, self._agree_js]
        return torch.cat(parts)

    def from_tensor(self, flat: Tensor, all_domains: list[str]) -> None:
        """Inverse of `to_tensor`: replace the sums. Domains with zero tokens are dropped."""
        K, P = self.num_teachers, len(self.pairs)
        flat = flat.detach().to("cpu", torch.float64)
        expected = len(all_domains) * (1 + F_ROWS * K) + 2 + 2 * P
        if flat.numel() != expected:
            raise ValueError(f"flat stats have {flat.numel()} values, expected {expected} for {len(all_domains)} domains")
        self._domain_tokens, self._domain_sums = {}, {}
        offset = 0
        for d in all_domains:
            tokens = int(round(flat[offset].item()))
            sums = flat[offset + 1 : offset + 1 + F_ROWS * K].reshape(F_ROWS, K).clone()
            offset += 1 + F_ROWS * K
            if tokens > 0:
                self._domain_tokens[d], self._domain_sums[d] = tokens, sums
        self._blend_entropy_sum = flat[offset].item()
        self._agree_tokens = int(round(flat[offset + 1].item()))
        self._agree_top1 = flat[offset + 2 : offset + 2 + P].clone()
        self._agree_js = flat[offset + 2 + P : offset + 2 + 2 * P].clone()

    def all_reduce(self, group_sum: Callable[[Tensor], Tensor], all_domains: list[str]) -> "BlendStats":
        """A NEW BlendStats holding the sums over all processes; self is unchanged.

        group_sum: a sum all-reduce of a flat float64 CPU tensor, returning the reduced tensor
        (move it to the backend's device and back inside if needed). all_domains: the union of
        every process's `domains()`, in the same order on every process.
        """
        reduced = BlendStats(self.teacher_names)
        reduced.from_tensor(group_sum(self.to_tensor(list(all_domains))), list(all_domains))
        return reduced
