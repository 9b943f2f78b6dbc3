"""Projecting a teacher's top-k into the student's vocabulary (align/projection.py)."""

from __future__ import annotations

import math

import pytest
import torch

from merge_distill.align import TokenBytes
from merge_distill.align.projection import project_topk, token_map
from merge_distill.pico import build_bpe_tokenizer, build_sentencepiece_tokenizer, prose_texts, stdlib_texts


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    root = tmp_path_factory.mktemp("proj")
    texts = stdlib_texts(30) + prose_texts(30)
    return (TokenBytes(build_sentencepiece_tokenizer(texts, 700, root / "sp")),
            TokenBytes(build_bpe_tokenizer(texts, 600, root / "bl")))


def test_the_map_is_the_identity_for_the_same_tokenizer(pair) -> None:
    _, bl = pair
    mapping = token_map(bl, bl)
    text_ids = [i for i, p in enumerate(bl.table) if p]
    assert torch.equal(mapping[text_ids], torch.tensor(text_ids))
    assert torch.equal(mapping[sorted(bl.special)], torch.tensor(sorted(bl.special)))  # EOS -> EOS


def test_every_teacher_token_maps_to_a_student_token_that_begins_its_bytes(pair) -> None:
    sp, bl = pair
    mapping = token_map(sp, bl)
    for v, piece in enumerate(sp.table):
        if not piece:  # special: the student's token of the same name, if it has one
            name = sp.tokenizer.convert_ids_to_tokens(v)
            assert mapping[v] == bl.tokenizer.get_vocab().get(name, -1) if name in bl.tokenizer.all_special_tokens else -1
            continue
        u = int(mapping[v])
        assert u >= 0 and piece.startswith(bl.table[u]), (v, piece)
        # and it is the longest such student token
        assert not any(bl.table[w] and len(bl.table[w]) > len(bl.table[u]) and piece.startswith(bl.table[w])
                       for w in range(len(bl.table)))


def test_projection_keeps_the_mass_and_merges_repeats() -> None:
    mapping = torch.tensor([0, 0, 1, -1, 2])  # teacher tokens 0 and 1 -> student 0; 3 spells nothing
    ids = torch.tensor([[0, 1, 2, 3], [4, 2, 0, 1]])
    probs = torch.tensor([[0.4, 0.2, 0.15, 0.05], [0.5, 0.2, 0.1, 0.1]])
    tail = torch.tensor([0.2, 0.1])
    out_ids, out_lp, out_tail = project_topk(ids, probs.log(), tail.log(), mapping)
    p = out_lp.exp()
    assert out_ids[0, :2].tolist() == [0, 1] and p[0, :2].tolist() == pytest.approx([0.6, 0.15])
    assert math.isinf(out_lp[0, 2]) and math.isinf(out_lp[0, 3])  # padding entries carry no mass
    assert out_tail[0].exp().item() == pytest.approx(0.25)  # the tail took the unmappable token's 0.05
    assert out_ids[1, :3].tolist() == [2, 0, 1] and p[1, :3].tolist() == pytest.approx([0.5, 0.2, 0.2])  # 0 + 1 -> student 0
    total = p.sum(-1) + out_tail.exp()
    assert total.tolist() == pytest.approx([1.0, 1.0])


def test_identity_projection_changes_nothing(pair) -> None:
    _, bl = pair
    mapping = token_map(bl, bl)
    g = torch.Generator().manual_seed(0)
    text_ids = torch.tensor([i for i, p in enumerate(bl.table) if p])
    logits = torch.randn(3, 5, len(text_ids), generator=g)
    lp, idx = torch.log_softmax(logits, -1).topk(8, -1)
    ids = text_ids[idx]
    tail = torch.log1p(-lp.exp().sum(-1))
    out_ids, out_lp, out_tail = project_topk(ids, lp, tail, mapping)
    assert torch.equal(out_ids, ids) and torch.allclose(out_lp, lp) and torch.allclose(out_tail, tail)
