"""Byte alignment across tokenizer families: byte-level BPE (GPT-2 / SmolLM2), SentencePiece with
a dummy prefix and byte fallback (Llama 2 / Gemma), and a byte-level BPE that splits digits one
by one (Llama 3 / Qwen). All three are trained here on standard-library text."""

from __future__ import annotations

import random

import pytest

from merge_distill.align import TokenBytes, align_row, special_counterparts, spans
from merge_distill.align.alignment import text_segments
from merge_distill.errors import UserError
from merge_distill.pico import (
    build_bpe_tokenizer,
    build_digit_bpe_tokenizer,
    build_sentencepiece_tokenizer,
    prose_texts,
    stdlib_texts,
)

ADVERSARIAL = [
    "def f(x):\n    return x * 12345  # café 東京 🙂\n\tdone",
    "    \t\t  \n\n\n        indented(  )   ",
    "3.14159265358979 + 2718281828 = 999999999999",
    "🙂🙃🤖👩‍💻 emoji ZWJ 👍🏽",
    "漢字かなカナ한국어 mixed Русский текст ελληνικά العربية",
    "\u200b\u00a0nbsp and zero width\u00ad soft",
    "tabs\tand\ttrailing spaces   \n",
    "x",
]


@pytest.fixture(scope="module")
def families(tmp_path_factory) -> dict[str, TokenBytes]:
    root = tmp_path_factory.mktemp("tokenizers")
    texts = stdlib_texts(30) + prose_texts(30)
    return {
        "byte_level": TokenBytes(build_bpe_tokenizer(texts, 600, root / "bl")),
        "sentencepiece": TokenBytes(build_sentencepiece_tokenizer(texts, 700, root / "sp")),
        "digits": TokenBytes(build_digit_bpe_tokenizer(texts, 800, root / "dg")),
    }


def random_texts(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    alphabet = list("abcxyz ABC\t\n  0123456789_.,;:()[]{}#'\"") + list("éüß東京語🙂🤖ñ한글αβ") + ["\u0301", "\u200d"]
    return ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 80))) for _ in range(n)]


def assert_spans_tile(tb: TokenBytes, text: str) -> None:
    """The tokens' byte spans cover the text's bytes in order, without gap or overlap."""
    ids, pieces = tb.encode(text)
    assert len(pieces) == len(ids)
    data = text.encode("utf-8")
    position = 0
    for i, piece in enumerate(pieces):
        # no gap, no overlap: each token's bytes are the text's bytes from where the last one ended
        assert data[position: position + len(piece)] == piece, (text, i, piece)
        raw = tb([ids[i]])[0]
        assert piece == raw or (i == next(k for k, p in enumerate(tb(ids)) if p) and raw == b" " + piece)
        position += len(piece)
    assert position == len(data)


@pytest.mark.parametrize("family", ["byte_level", "sentencepiece", "digits"])
def test_spans_tile_the_text_on_random_and_adversarial_text(families, family) -> None:
    for text in ADVERSARIAL + random_texts(300, seed=hash(family) % 1000):
        assert_spans_tile(families[family], text)


def reference_alignment(student_ids: list[int], student: TokenBytes, teacher: TokenBytes,
                        text: str) -> tuple[list[int], list[int]]:
    """The definition, checked pair by pair (quadratic): position t matches the first teacher
    position j whose next token is text and starts at the byte where student token t + 1 starts.
    Returns (to_teacher, teacher ids)."""
    teacher_ids, t_pieces = teacher.encode(text)
    s_pieces = student(student_ids)
    s_starts, t_starts = spans(s_pieces), spans(t_pieces)
    out = []
    for t in range(len(student_ids)):
        match = -1
        if t + 1 < len(student_ids) and s_pieces[t + 1]:
            for j in range(len(teacher_ids) - 1):
                if t_pieces[j + 1] and t_starts[j + 1] == s_starts[t + 1]:
                    match = j
                    break
        out.append(match)
    return out, teacher_ids


@pytest.mark.parametrize("student_family", ["byte_level", "sentencepiece", "digits"])
@pytest.mark.parametrize("teacher_family", ["byte_level", "sentencepiece", "digits"])
def test_alignment_matches_the_definition(families, student_family, teacher_family) -> None:
    student, teacher = families[student_family], families[teacher_family]
    for text in ADVERSARIAL + random_texts(60, seed=7):
        ids = student.tokenizer(text, add_special_tokens=False)["input_ids"]
        row = align_row(ids, student, teacher)
        row_text = b"".join(student(ids)).decode("utf-8")  # the student's text: a SentencePiece student's dummy space included
        expected, teacher_ids = reference_alignment(ids, student, teacher, row_text)
        assert row.teacher_ids == teacher_ids and row.to_teacher == expected, text
        matched = [j for j in row.to_teacher if j >= 0]
        assert matched == sorted(set(matched))  # in order, each teacher position at most once
        if student_family == teacher_family:  # the same tokenizer: every position with a next token matches
            assert row.covered == sum(1 for p in student(ids)[1:] if p)


def test_same_text_same_tokenizer_aligns_one_to_one(families) -> None:
    tb = families["byte_level"]
    ids = tb.tokenizer(ADVERSARIAL[0], add_special_tokens=False)["input_ids"]
    row = align_row(ids, tb, tb)
    assert row.to_teacher == list(range(len(ids) - 1)) + [-1]
    assert row.student_next_bytes[:-1] == row.teacher_next_bytes[:-1]


def test_sentencepiece_prefix_space_and_byte_fallback(families) -> None:
    sp, bl = families["sentencepiece"], families["byte_level"]
    text = "hello ☃ world"  # the snowman is in no vocabulary: three <0xNN> tokens in SentencePiece
    ids, starts = sp.encode(text)
    tokens = sp.tokenizer.convert_ids_to_tokens(ids)
    assert tokens[0] == "<s>" and tokens[1].startswith("▁")  # BOS, then the dummy prefix space
    assert ["<0xE2>", "<0x98>", "<0x83>"] == [t for t in tokens if t.startswith("<0x")]
    row = align_row(bl.tokenizer(text, add_special_tokens=False)["input_ids"], bl, sp)
    assert row.to_teacher[-1] == -1 and row.covered >= 3
    # the student's first position (predicting its second token) is matched through BOS + bytes, not by index
    first = row.to_teacher[0]
    assert first >= 0 and sp.tokenizer.convert_ids_to_tokens(row.teacher_ids)[first + 1] != "<s>"


def test_digits_split_one_by_one_match_only_at_shared_boundaries(families) -> None:
    bl, dg = families["byte_level"], families["digits"]
    text = "x = 100 or 0x00ff"
    s_ids = bl.tokenizer(text, add_special_tokens=False)["input_ids"]
    row = align_row(s_ids, bl, dg)
    digits = [i for i, t in enumerate(dg.tokenizer.convert_ids_to_tokens(row.teacher_ids)) if t.strip("Ġ").isdigit()]
    assert len(digits) == 6  # the teacher spells every digit alone
    s_tokens = bl.tokenizer.convert_ids_to_tokens(s_ids)
    assert any(len(t.strip("Ġ")) > 1 and t.strip("Ġ").isdigit() for t in s_tokens)  # the student merges digits
    # every student boundary inside the number is a teacher boundary too: all of them are matched
    assert all(j >= 0 for j in row.to_teacher[:-1])
    # the teacher has boundaries the student lacks: fewer matches than teacher positions
    assert row.covered < len(row.teacher_ids) - 1


def test_row_that_starts_and_ends_inside_a_character(families) -> None:
    bl, sp = families["byte_level"], families["sentencepiece"]
    text = "東京語🙂 and 🤖"
    ids = bl.tokenizer(text, add_special_tokens=False)["input_ids"]
    pieces = bl(ids)
    assert any(len(p) < 3 and p[0] >= 0x80 for p in pieces), "the small vocabulary splits characters into bytes"
    cut = next(i for i, p in enumerate(pieces) if 0x80 <= p[0] < 0xC0)  # a token that continues a character
    row = align_row(ids[cut:], bl, sp)
    assert row.text_bytes < sum(len(p) for p in pieces[cut:])  # the broken front is not given to the teacher
    assert row.to_teacher[0] == -1 or row.covered > 0
    assert row.covered > 0


def test_text_segments_skip_bytes_that_are_no_utf8() -> None:
    assert text_segments("héllo".encode()) == [(0, "héllo")]
    assert text_segments("héllo".encode()[2:]) == [(1, "llo")]  # a character cut at the front
    assert text_segments(b"ab\xffcd\xe2\x82" + "é".encode()) == [(0, "ab"), (3, "cd"), (7, "é")]
    assert text_segments(b"\xff\xfe") == []


def test_a_sample_with_bytes_out_of_order_aligns_around_them(families) -> None:
    """A student's own sample may put byte tokens in an order no UTF-8 text has (an on-policy
    row). The text on either side still reaches the teacher at its own bytes; the positions that
    predict the broken bytes are not covered."""
    bl, sp = families["byte_level"], families["sentencepiece"]
    left, right = (bl.tokenizer(t, add_special_tokens=False)["input_ids"] for t in ("def f(x):", " return x"))
    byte_tokens = [i for i in range(len(bl.tokenizer)) if bl([i])[0] in (b"\x82", b"\xe2")]
    assert len(byte_tokens) == 2, "the byte-level vocabulary has every single byte"
    ids = left + byte_tokens[::-1] + right  # a continuation byte before its lead byte: no UTF-8
    with pytest.raises(UnicodeDecodeError):
        b"".join(bl(ids)).decode("utf-8")
    row = align_row(ids, bl, sp)
    expected_bytes = len("def f(x):".encode()) + len(" return x".encode())
    assert row.text_bytes == expected_bytes
    n = len(left)
    assert row.to_teacher[n - 1] == -1 and row.to_teacher[n] == -1  # they predict the broken bytes
    assert row.covered > 0 and any(j >= 0 for j in row.to_teacher[n + 2:])


def test_packed_documents_reach_the_teacher_as_its_own_documents(families) -> None:
    """A byte-level student row "first doc</s>second" (no BOS) -> a SentencePiece teacher's
    "<s> first doc </s> <s> second": EOS maps to the teacher's EOS, each document starts with the
    teacher's BOS, and the position that predicts EOS is matched with the teacher's."""
    sp, bl = families["sentencepiece"], families["byte_level"]
    eos = bl.tokenizer.eos_token_id
    first = bl.tokenizer("first doc", add_special_tokens=False)["input_ids"]
    ids = first + [eos] + bl.tokenizer("second", add_special_tokens=False)["input_ids"]
    row = align_row(ids, bl, sp)
    assert bl([eos]) == [b""] and sp.prefix == [sp.tokenizer.bos_token_id]
    expected = sp.encode("first doc")[0] + [sp.tokenizer.eos_token_id] + sp.encode("second")[0]
    assert row.teacher_ids == expected
    k = ids.index(eos)
    j = row.to_teacher[k - 1]  # predicting EOS
    assert row.teacher_ids[j + 1] == sp.tokenizer.eos_token_id and row.student_next_bytes[k - 1] == 0
    j = row.to_teacher[k]  # at EOS, predicting the second document's first token: the teacher's BOS position
    assert row.teacher_ids[j] == sp.tokenizer.bos_token_id and row.teacher_ids[j - 1] == sp.tokenizer.eos_token_id
    assert row.text_bytes == len(b"first docsecond")


def test_a_student_bos_is_not_given_twice(families) -> None:
    """A SentencePiece student whose rows hold "<s> a </s> <s> b" -> a SentencePiece teacher gets
    one BOS per document; both EOS-predicting positions and all text positions are matched."""
    sp = families["sentencepiece"]
    ids = sp.encode("alpha beta")[0] + [sp.tokenizer.eos_token_id] + sp.encode("gamma")[0]
    row = align_row(ids, sp, sp)
    assert row.teacher_ids == ids
    assert row.to_teacher == list(range(len(ids) - 1)) + [-1]


def test_special_tokens_without_a_counterpart_are_dropped(families) -> None:
    bl, dg = families["byte_level"], families["digits"]
    assert special_counterparts(bl, dg)[bl.tokenizer.eos_token_id] == dg.tokenizer.eos_token_id
    marker = max(bl.special) + 1000  # an id the student's table does not spell: no counterpart
    ids = bl.tokenizer("x = 1", add_special_tokens=False)["input_ids"]
    row = align_row(ids[:2] + [marker] + ids[2:], bl, dg)
    assert marker not in row.teacher_ids and row.to_teacher[1] == -1  # predicting the marker: no teacher target


def test_unsupported_and_normalising_tokenizers_are_refused(tmp_path) -> None:
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(["hello world"] * 5, trainers.WordPieceTrainer(vocab_size=50, special_tokens=["[UNK]"]))
    with pytest.raises(UserError, match="not supported across tokenizers"):
        TokenBytes(PreTrainedTokenizerFast(tokenizer_object=tok))
    lower = build_bpe_tokenizer(["Hello World"] * 5, 300, tmp_path / "lower")
    lower.backend_tokenizer.normalizer = normalizers.Lowercase()
    (problem,) = TokenBytes(lower).check("teachers[x]")
    assert problem.startswith("teachers[x]: its tokenizer changes the text it encodes")
