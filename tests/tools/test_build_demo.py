"""Fast checks of the demo-asset pieces on tiny inputs (the full build is run by hand, see
docs/DEMO.md): cleaning, chunking, the held-out split, the tokenizer, a few training steps, the
stamp, and the support-chat generator."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch

TOOLS = Path(__file__).resolve().parents[2] / "tools"
sys.path.insert(0, str(TOOLS))

import build_demo  # noqa: E402
import corpora  # noqa: E402
import make_support_data  # noqa: E402

CODE = '''import os


def add(a, b):
\t"""Add two numbers."""
\treturn a + b   


class Point:
    def __init__(self, x, y):
        self.x = x
        self.y = y
'''
PROSE = ("To be, or not to be, that is the question:\nWhether 'tis nobler in the mind to suffer\n\n"
         "The slings and arrows of outrageous fortune,\nOr to take arms against a sea of troubles.")


def test_clean_text_normalises_whitespace_and_unicode() -> None:
    raw = "caf\u0065\u0301  \r\nline\ttwo\r\n\n\n\n\n\nend\ufeff  "
    cleaned = corpora.clean_text(raw)
    assert cleaned == "caf\u00e9\nline    two\n\n\nend"
    assert corpora.clean_text(cleaned) == cleaned  # idempotent


def test_chunk_text_keeps_paragraphs_and_bounds_size() -> None:
    paragraphs = [f"paragraph {i} " + "x" * (40 + 7 * i) for i in range(30)]
    text = "\n\n".join(paragraphs)
    chunks = corpora.chunk_text(text, max_chars=300)
    assert "\n\n".join(chunks) == text  # nothing lost, nothing reordered
    assert all(len(c) <= 300 for c in chunks)
    # A paragraph longer than the budget stays whole rather than being cut mid-way.
    assert corpora.chunk_text("a" * 500 + "\n\nb", max_chars=100) == ["a" * 500, "b"]


def test_stable_hash_is_fixed_across_runs() -> None:
    # sha256("abc")[:8] as a big-endian integer: independent of PYTHONHASHSEED.
    assert corpora.stable_hash("abc") == int("ba7816bf8f01cfea", 16)


def _docs() -> list[corpora.Document]:
    docs = [corpora.Document(f"text of doc {i} " * 20, f"group{i % 37}") for i in range(400)]
    return docs + [corpora.Document(docs[0].text, "group0")]  # an exact duplicate


def test_split_is_disjoint_deterministic_and_grouped() -> None:
    docs = _docs()
    train, evals = corpora.split_documents(docs, 0.2, 10**9, 10**9)
    # Same result whatever the input order (sides are ordered by text hash).
    assert (train, evals) == corpora.split_documents(list(reversed(docs)), 0.2, 10**9, 10**9)
    assert not set(train) & set(evals)
    assert len(train) + len(evals) == 400  # the duplicate was dropped
    group_of = {d.text: d.group for d in docs}
    train_groups = {group_of[t] for t in train}
    eval_groups = {group_of[t] for t in evals}
    assert eval_groups and not train_groups & eval_groups
    # Eval groups are exactly those whose hash is in the lowest 20% of the 64-bit range.
    expected = {f"group{g}" for g in range(37) if corpora.stable_hash(f"group{g}") < 0.2 * 2**64}
    assert eval_groups == expected


def test_split_caps_sizes() -> None:
    train, evals = corpora.split_documents(_docs(), 0.2, train_chars=2000, eval_chars=500)
    doc_len = len(_docs()[0].text)
    # Documents are added until the budget is reached, so at most one document overshoots it.
    assert 2000 <= sum(map(len, train)) < 2000 + doc_len
    assert 500 <= sum(map(len, evals)) < 500 + doc_len


def test_code_documents_from_a_tiny_stdlib(tmp_path: Path) -> None:
    (tmp_path / "pkg").mkdir()
    (tmp_path / "test").mkdir()
    (tmp_path / "pkg" / "mod.py").write_text(CODE * 4)
    (tmp_path / "test" / "test_mod.py").write_text(CODE * 4)  # tests are skipped
    docs = corpora.code_documents(tmp_path, chunk_chars=400)
    assert docs and {d.group for d in docs} == {"code:pkg/mod.py"}
    assert all("\t" not in d.text and "   \n" not in d.text for d in docs)
    assert docs == corpora.code_documents(tmp_path, chunk_chars=400)


def test_jsonl_round_trip(tmp_path: Path) -> None:
    texts = [PROSE, "ünïcode → ok", CODE]
    chars = corpora.write_jsonl(tmp_path / "a" / "train.jsonl", texts)
    assert chars == sum(map(len, texts))
    assert corpora.read_jsonl_texts(tmp_path / "a" / "train.jsonl") == texts


@pytest.fixture(scope="module")
def tiny_tokenizer(tmp_path_factory: pytest.TempPathFactory):
    out = tmp_path_factory.mktemp("tok")
    texts = [CODE, PROSE, "Problem: 2 + 2 = ?\n\nSolution:\n4\nAnswer: 4"] * 20
    build_demo.train_tokenizer(texts, out, vocab_size=400)
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(out)


def test_tokenizer_round_trips_and_has_special_tokens(tiny_tokenizer) -> None:
    tok = tiny_tokenizer
    for text in (CODE, PROSE, "unseen: Ωmega ∑ 🙂 \t tabs", ""):
        assert tok.decode(tok(text, add_special_tokens=False)["input_ids"]) == text
    assert len(tok) == 400
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id) == (0, 1, 2)
    assert tok.model_max_length == 512
    assert tok("hi")["input_ids"] == tok("hi", add_special_tokens=False)["input_ids"]


def test_chat_template_marks_assistant_turns(tiny_tokenizer) -> None:
    tok = tiny_tokenizer
    messages = [{"role": "user", "content": "Where is my order?"},
                {"role": "assistant", "content": "It shipped."}]
    text = tok.apply_chat_template(messages, tokenize=False)
    assert text == "<|user|>\nWhere is my order?\n<|assistant|>\nIt shipped.<|eos|>\n"
    out = tok.apply_chat_template(messages, tokenize=True, return_dict=True,
                                  return_assistant_tokens_mask=True)
    kept = [i for i, m in zip(out["input_ids"], out["assistant_masks"]) if m]
    assert tok.decode(kept) == "It shipped.<|eos|>"
    assert tok.apply_chat_template(messages[:1], tokenize=False, add_generation_prompt=True) \
        .endswith("<|assistant|>\n")


def test_token_stream_separates_documents_with_eos(tiny_tokenizer) -> None:
    stream = build_demo.token_stream([PROSE, CODE], tiny_tokenizer)
    eos = tiny_tokenizer.eos_token_id
    positions = (stream == eos).nonzero().flatten().tolist()
    assert len(positions) == 2 and positions[1] == stream.numel() - 1
    assert tiny_tokenizer.decode(stream[: positions[0]].tolist()) == PROSE


def test_training_is_deterministic_and_lowers_perplexity(tiny_tokenizer) -> None:
    torch.set_num_threads(1)
    params = build_demo.BuildParams(hidden_size=32, num_layers=1, num_heads=2,
                                    intermediate_size=64, seq_len=32, batch_size=4, steps=30,
                                    warmup_steps=3, lr=1e-2)
    stream = build_demo.token_stream([PROSE] * 30, tiny_tokenizer)
    untrained = build_demo.new_model(params, tiny_tokenizer).eval()
    # A random init predicts close to uniformly: perplexity near the vocabulary size.
    ppl0 = build_demo.perplexity(untrained, stream, params.seq_len, 512)
    assert 0.5 * len(tiny_tokenizer) < ppl0 < 2 * len(tiny_tokenizer)
    first = build_demo.train_teacher(stream, params, tiny_tokenizer, seed=3)
    second = build_demo.train_teacher(stream, params, tiny_tokenizer, seed=3)
    for (name, a), (_, b) in zip(first.state_dict().items(), second.state_dict().items()):
        assert torch.equal(a, b), name
    assert build_demo.perplexity(first, stream, params.seq_len, 512) < ppl0 / 5


def test_perplexity_matches_a_plain_formula(tiny_tokenizer) -> None:
    params = build_demo.BuildParams(hidden_size=16, num_layers=1, num_heads=2,
                                    intermediate_size=32)
    model = build_demo.new_model(params, tiny_tokenizer).eval()
    stream = build_demo.token_stream([PROSE, CODE], tiny_tokenizer)
    seq_len, n_blocks = 8, (stream.numel() - 1) // 8
    nll, count = 0.0, 0
    for b in range(n_blocks):
        block = stream[b * seq_len:(b + 1) * seq_len]
        with torch.no_grad():
            logprobs = torch.log_softmax(model(input_ids=block[None]).logits[0].float(), -1)
        for t in range(seq_len - 1):
            nll -= logprobs[t, block[t + 1]].item()
            count += 1
    expected = math.exp(nll / count)
    assert build_demo.perplexity(model, stream, seq_len, 10**6) == pytest.approx(expected, rel=1e-5)


def test_stamp_detects_parameter_changes(tmp_path: Path) -> None:
    digest = build_demo.build_digest(build_demo.BuildParams())
    assert digest == build_demo.build_digest(build_demo.BuildParams())
    assert digest != build_demo.build_digest(build_demo.BuildParams(steps=1))
    for path in build_demo.expected_outputs(tmp_path):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("{}")
    assert not build_demo.is_up_to_date(tmp_path, digest)  # no stamp yet
    (tmp_path / "build_stamp.json").write_text(json.dumps({"digest": digest}))
    assert build_demo.is_up_to_date(tmp_path, digest)
    (tmp_path / "teachers" / "math" / "config.json").unlink()
    assert not build_demo.is_up_to_date(tmp_path, digest)


def test_specialists_win() -> None:
    good = {"code": {"code": 5.0, "prose": 50.0, "math": 40.0},
            "prose": {"code": 90.0, "prose": 6.0, "math": 70.0},
            "math": {"code": 80.0, "prose": 60.0, "math": 3.0}}
    assert build_demo.specialists_win(good)
    good["code"]["math"] = 2.0
    assert not build_demo.specialists_win(good)


def test_support_data_is_valid_deterministic_and_disjoint(tmp_path: Path) -> None:
    make_support_data.write_dataset(tmp_path / "a", n=120, seed=7)
    make_support_data.write_dataset(tmp_path / "b", n=120, seed=7)
    make_support_data.write_dataset(tmp_path / "c", n=120, seed=8)
    for name in ("train.jsonl", "eval.jsonl"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    assert (tmp_path / "a" / "train.jsonl").read_bytes() != (tmp_path / "c" / "train.jsonl").read_bytes()
    rows = {name: [json.loads(line) for line in (tmp_path / "a" / f"{name}.jsonl").open()]
            for name in ("train", "eval")}
    assert (len(rows["train"]), len(rows["eval"])) == (108, 12)
    for row in rows["train"] + rows["eval"]:
        assert row["domain"] == "support"
        assert [m["role"] for m in row["messages"]] == ["user", "assistant"]
        assert all(isinstance(m["content"], str) and len(m["content"]) > 10 for m in row["messages"])
    questions = {name: {r["messages"][0]["content"] for r in rows[name]} for name in rows}
    assert len(questions["train"]) == 108 and not questions["train"] & questions["eval"]
    # Order numbers in the question come back in the answer (the slots are consistent).
    for row in rows["train"]:
        user, assistant = (m["content"] for m in row["messages"])
        for token in user.replace("?", " ").replace(",", " ").replace(")", " ").split():
            if token.startswith("LH-"):
                assert token.rstrip(".") in assistant
