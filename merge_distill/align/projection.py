"""A teacher's top-k in its own vocabulary -> a sparse target in the student's vocabulary.

Each teacher token v is mapped to one student token u(v): the student token with exactly v's
bytes when the student has one, else the longest student token that v's bytes begin with (the
student's first step towards spelling v). Where the positions are aligned (both next tokens
start at the same byte) p_teacher(v) is the teacher's probability that the text goes on with v's
bytes, and u(v) is the student token that begins them, so the mass moves to u(v); teacher tokens
that land on the same student token add up (in log space). The teacher's tail (the mass outside
its top k) stays a tail: spread evenly over the student tokens not listed, exactly as the cache's
top-k + tail targets are read (losses/sparse.py), so the projected target goes through the sparse
loss driver unchanged: every divergence, both blends, chunked, no [B, T, V_teacher] copy.

With the student's own tokenizer the map is the identity, the projection changes nothing, and at
k = V the sparse driver equals the dense one (tests/losses/test_sparse.py): the cross-tokenizer
path then gives today's loss.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from merge_distill.align.token_bytes import TokenBytes, special_counterparts


def token_map(teacher: TokenBytes, student: TokenBytes) -> Tensor:
    """[V_teacher] long: u(v) for every teacher id. A special token maps to the student's special
    token of the same role (BOS, EOS) or name (chat markers), else to -1 (its mass then joins the tail)."""
    by_bytes: dict[bytes, int] = {}
    for u, piece in enumerate(student.table):
        if piece and piece not in by_bytes:
            by_bytes[piece] = u
    longest = max((len(p) for p in by_bytes), default=1)
    out = torch.full((len(teacher.table),), -1, dtype=torch.long)
    for v, u in special_counterparts(teacher, student).items():
        if v < len(out):
            out[v] = u
    for v, piece in enumerate(teacher.table):
        for length in range(min(len(piece), longest), 0, -1):  # exact match first, then shorter prefixes
            u = by_bytes.get(piece[:length])
            if u is not None:
                out[v] = u
                break
    return out


@torch.no_grad()
def project_topk(ids: Tensor, logprobs: Tensor, tail: Tensor, mapping: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Teacher top-k (ids [..., k] in its vocabulary, log-probs [..., k], log tail [...]) -> the same
    in the student's vocabulary: ids [..., k] (a student token listed once; repeats become padding
    entries with log-prob -inf), log-probs [..., k], and the tail, which also takes the mass of
    teacher tokens that map to no student token."""
    student_ids = mapping[ids.long()]                                   # [..., k], -1 = unmappable
    unmapped = student_ids < 0
    # The mass of unmappable tokens joins the tail: log(exp(tail) + sum exp(lp)).
    lost = torch.where(unmapped, logprobs.float(), torch.full_like(logprobs.float(), -math.inf))
    new_tail = torch.logaddexp(tail.float(), torch.logsumexp(lost, dim=-1))
    safe = torch.where(unmapped, torch.zeros_like(student_ids), student_ids)
    # Merge repeats: sort by student id, logsumexp each run into its first entry.
    order = torch.argsort(safe * 2 + unmapped.long(), dim=-1, stable=True)
    sorted_ids = safe.gather(-1, order)
    sorted_lp = torch.where(unmapped, torch.full_like(logprobs.float(), -math.inf), logprobs.float()).gather(-1, order)
    first = torch.ones_like(sorted_ids, dtype=torch.bool)
    first[..., 1:] = sorted_ids[..., 1:] != sorted_ids[..., :-1]
    run = first.long().cumsum(-1) - 1                                   # run index of every entry
    merged = torch.full_like(sorted_lp, -math.inf)
    peak = torch.full_like(sorted_lp, -math.inf).scatter_reduce(-1, run, sorted_lp, reduce="amax")
    shifted = torch.where(torch.isfinite(peak.gather(-1, run)), sorted_lp - peak.gather(-1, run), sorted_lp)
    sums = torch.zeros_like(sorted_lp).scatter_add(-1, run, shifted.exp())
    merged = torch.where(torch.isfinite(peak), peak + sums.log(), merged)
    run_ids = torch.zeros_like(sorted_ids).scatter_reduce(-1, run, sorted_ids, reduce="amax", include_self=False)
    n_runs = first.sum(-1, keepdim=True)
    slot = torch.arange(ids.shape[-1], device=ids.device).expand_as(run_ids)
    keep = slot < n_runs
    # Padding entries repeat a listed id with -inf mass: the bucket union ignores them.
    out_ids = torch.where(keep, run_ids, run_ids[..., :1])
    out_lp = torch.where(keep, merged, torch.full_like(merged, -math.inf))
    # Entries ordered by log-prob, largest first, as the cache stores them.
    by_mass = torch.argsort(out_lp, dim=-1, descending=True, stable=True)
    return out_ids.gather(-1, by_mass).to(ids.dtype), out_lp.gather(-1, by_mass).to(logprobs.dtype), new_tail
