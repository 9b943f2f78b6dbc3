"""Fixtures of the cross-tokenizer tests."""

from __future__ import annotations

import pytest

from merge_distill.pico import build_sentencepiece_tokenizer, pico_llama, prose_texts, stdlib_texts


@pytest.fixture(scope="module")
def sp_teacher(tmp_path_factory):
    """A pico teacher with a SentencePiece tokenizer of its own (and 8 padded embedding rows)."""
    folder = tmp_path_factory.mktemp("sp_teacher")
    tokenizer = build_sentencepiece_tokenizer(stdlib_texts(30) + prose_texts(30), 500, folder)
    pico_llama(len(tokenizer) + 8, seed=11, layers=2).save_pretrained(folder)
    return folder
