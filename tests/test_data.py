"""Data: chat targets on assistant tokens only, packing, weighted seeded mixing, domain tags."""

from __future__ import annotations

import json

import torch
from transformers import AutoTokenizer

from merge_distill.data import MixedStream, SourceRows, chat_tokens
from merge_distill.rowstore import build_rows
from merge_distill.models import compare_vocabs, cut_vocab
from merge_distill.schema import DataSource
from merge_distill.signals import IGNORE_INDEX, shift_targets


def test_chat_targets_are_exactly_the_assistant_turns(pico):
    tok = AutoTokenizer.from_pretrained(pico["tokenizer"])
    messages = [{"role": "user", "content": "Where is my order?"},
                {"role": "assistant", "content": "It ships tomorrow."},
                {"role": "user", "content": "Thanks"},
                {"role": "assistant", "content": "You are welcome."}]
    ids, labels = chat_tokens(messages, tok)
    assert len(ids) == len(labels)
    target_text = tok.decode([t for t in labels if t != IGNORE_INDEX])
    assert target_text == "It ships tomorrow.</s>You are welcome.</s>"
    assert "Where is my order" not in target_text and "Thanks" not in target_text
    assert tok.decode(ids).startswith("<|user|>\nWhere is my order?")


def test_chat_source_rows_mask_prompts(pico, tokenized_store):
    tok = AutoTokenizer.from_pretrained(pico["tokenizer"])
    source = DataSource(type="jsonl", path=str(pico["chat"]), field="messages", domain="support")
    rows = build_rows(source, "data.train[0]", tok, 64, False, tokenized_store)
    assert len(rows) == 12
    for ids, labels, mask in zip(*rows.take(slice(0, len(rows)))):
        kept = labels[labels != IGNORE_INDEX]
        assert "reset it" in tok.decode(kept) and "How do I" not in tok.decode(kept)
        assert torch.equal(labels[labels != IGNORE_INDEX], ids[labels != IGNORE_INDEX])
        assert int(mask.sum()) == int((ids != tok.pad_token_id).sum())


def test_packing_concatenates_with_eos_and_keeps_every_token(pico, tmp_path):
    tok = AutoTokenizer.from_pretrained(pico["tokenizer"])
    path = tmp_path / "t.jsonl"
    texts = ["alpha beta gamma " * 5, "delta epsilon " * 7, "zeta eta theta " * 3]
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    source = DataSource(type="jsonl", path=str(path), domain="x")
    rows = build_rows(source, "data.train[0]", tok, 8, True, tmp_path / "store")
    stream = [t for t in tok(texts, add_special_tokens=False)["input_ids"] for t in t + [tok.eos_token_id]]
    n = len(stream) // 8
    got = rows.take(slice(0, len(rows)))
    assert torch.equal(got.input_ids.flatten(), torch.tensor(stream[: n * 8]))
    assert torch.equal(got.labels, got.input_ids) and bool(got.attention_mask.all())


def _rows(label: str, n: int, offset: int) -> SourceRows:
    ids = torch.arange(offset, offset + n).unsqueeze(1).repeat(1, 4)
    return SourceRows.from_tensors(label, label, ids, ids.clone(), torch.ones_like(ids))


def test_mixing_follows_weights_is_seeded_and_keeps_domains():
    sources = [_rows("code", 10, 0), _rows("prose", 10, 100)]
    stream = MixedStream(sources, [3.0, 1.0], seed=5, total_rows=4000)
    batch = stream.rows(0, 4000)
    is_code = torch.tensor([d == "code" for d in batch.domains])
    assert abs(is_code.float().mean().item() - 0.75) < 0.03
    assert bool(((batch.input_ids[:, 0] < 100) == is_code).all()), "domain tag travels with its row"
    again = MixedStream(sources, [3.0, 1.0], seed=5, total_rows=4000).rows(1234, 16)
    assert torch.equal(again.input_ids, stream.rows(1234, 16).input_ids)
    other = MixedStream(sources, [3.0, 1.0], seed=6, total_rows=4000).rows(0, 64)
    assert not torch.equal(other.input_ids, stream.rows(0, 64).input_ids)
    # every row of a source is used once per pass before any repeats
    code_rows = batch.input_ids[is_code][:10, 0].tolist()
    assert sorted(code_rows) == list(range(10))


def test_targets_shift_and_vocab_cut():
    labels = torch.tensor([[5, 6, 7, IGNORE_INDEX]])
    assert shift_targets(labels).tolist() == [[6, 7, IGNORE_INDEX, IGNORE_INDEX]]
    logits = torch.randn(1, 2, 10)
    cut = cut_vocab(logits, 8)
    assert cut.shape == (1, 2, 8) and cut.data_ptr() == logits.data_ptr()


def test_padded_vocab_rows_never_reach_the_softmax(make_recipe):
    """Pico models have 8 padded embedding rows: huge logits there must not change the loss."""
    from merge_distill.engine import train_step
    from merge_distill.recipe import load_recipe
    from merge_distill.engine import setup_run

    parts = setup_run(load_recipe(make_recipe()))
    teacher = parts.training.source.models[0]
    assert teacher.lm_head.weight.shape[0] == parts.training.vocab_size + 8
    before = train_step(parts.training, parts.plan, 0).loss
    parts2 = setup_run(load_recipe(make_recipe(name="r2.yaml", output={"dir": str(parts.run_dir) + "-b"})))
    with torch.no_grad():
        for model in parts2.training.source.models:
            model.lm_head.weight[parts2.training.vocab_size:] = 1e3  # padded rows: enormous logits
    assert abs(train_step(parts2.training, parts2.plan, 0).loss - before) < 1e-6


def test_compare_vocabs_is_empty_for_same_tokenizer(pico):
    tok = AutoTokenizer.from_pretrained(pico["tokenizer"])
    assert compare_vocabs(tok, AutoTokenizer.from_pretrained(pico["teacher_a"])) == ""
