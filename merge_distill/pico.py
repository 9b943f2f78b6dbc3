"""Pico models and data built offline: a local BPE tokenizer and random-init Llama models.

Used by the tests (fixtures) and by `tools/build_pico.py`. Nothing here touches a hub.
"""

from __future__ import annotations

import ast
import json
import sysconfig
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
from transformers.utils import logging as hf_logging

hf_logging.disable_progress_bar()

SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<|user|>", "<|assistant|>", "<|system|>"]
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}"
    "{% if m['role'] == 'assistant' %}{{ eos_token }}{% endif %}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def build_bpe_tokenizer(texts: list[str], vocab_size: int, out_dir: Path, model_max_length: int = 2048) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE on `texts` and save it as a transformers tokenizer directory."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
        model_max_length=model_max_length,
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(out_dir)
    return fast


def build_digit_bpe_tokenizer(texts: list[str], vocab_size: int, out_dir: Path) -> PreTrainedTokenizerFast:
    """A byte-level BPE that splits digits one by one (as Llama 3 and Qwen do)."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    fast.save_pretrained(out_dir)
    return fast


def build_sentencepiece_tokenizer(texts: list[str], vocab_size: int, out_dir: Path) -> PreTrainedTokenizerFast:
    """A SentencePiece-style BPE as in Llama 2 / Gemma: "▁" for spaces and a dummy prefix before
    the first word, <0xNN> byte-fallback tokens for bytes outside the vocabulary, BOS added."""
    base = Tokenizer(models.BPE())
    base.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    base.train_from_iterator(texts, trainer=trainers.BpeTrainer(vocab_size=vocab_size, limit_alphabet=200,
                                                                show_progress=False))
    trained = json.loads(base.to_str())["model"]
    specials = ["<unk>", "<s>", "</s>"]
    vocab = {name: i for i, name in enumerate(specials + [f"<0x{b:02X}>" for b in range(256)])}
    for token in sorted(trained["vocab"], key=trained["vocab"].get):
        vocab.setdefault(token, len(vocab))
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in trained["merges"]]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, byte_fallback=True, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    tok.decoder = decoders.Sequence([decoders.ByteFallback(), decoders.Metaspace(replacement="▁", prepend_scheme="first")])
    tok.add_special_tokens(specials)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   pad_token="<unk>")
    fast.save_pretrained(out_dir)
    return fast


def stdlib_texts(limit_files: int = 40, max_chars: int = 6000) -> list[str]:
    """A few real Python files from the standard library (present on every machine)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in root.glob("*.py"))[:limit_files]
    return [p.read_text(encoding="utf-8", errors="ignore")[:max_chars] for p in files]


def prose_texts(limit_files: int = 60) -> list[str]:
    """English prose: the docstrings of standard-library modules and functions."""
    root = Path(sysconfig.get_paths()["stdlib"])
    docs: list[str] = []
    for path in sorted(root.glob("*.py"))[:limit_files]:
        try:
            tree = ast.parse(path.read_text(encoding="utf-8", errors="ignore"))
        except SyntaxError:
            continue
        for node in [tree, *ast.walk(tree)]:
            if isinstance(node, (ast.Module, ast.FunctionDef, ast.ClassDef)):
                doc = ast.get_docstring(node)
                if doc and len(doc) > 200:
                    docs.append(doc)
    return docs[:80]


def pico_llama(vocab_rows: int, seed: int, hidden: int = 32, layers: int = 2, max_len: int = 256) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_rows, hidden_size=hidden, intermediate_size=hidden * 2, num_hidden_layers=layers,
        num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=max_len,
        tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=0,
    )
    return LlamaForCausalLM(config)


def build_pico(out_dir: str | Path, vocab_size: int = 384, padded_rows: int = 8, seed: int = 0) -> dict[str, Path]:
    """Tokenizer, two pico teachers, a pico student and two small jsonl corpora (code, prose).

    Models have `padded_rows` more embedding rows than the tokenizer has tokens, so that the
    vocabulary cut is always exercised.
    """
    out = Path(out_dir)
    code, prose = stdlib_texts(), prose_texts()
    tokenizer = build_bpe_tokenizer(code + prose, vocab_size, out / "tokenizer")
    rows = len(tokenizer) + padded_rows
    paths = {"tokenizer": out / "tokenizer"}
    for name, model_seed, layers in (("teacher_a", seed + 1, 2), ("teacher_b", seed + 2, 2), ("student", seed + 3, 1)):
        model = pico_llama(rows, model_seed, layers=layers)
        model.save_pretrained(out / name)
        tokenizer.save_pretrained(out / name)
        paths[name] = out / name
    data = out / "data"
    data.mkdir(parents=True, exist_ok=True)
    for name, texts in (("code", code), ("prose", prose)):
        with open(data / f"{name}.jsonl", "w", encoding="utf-8") as fh:
            for text in texts:
                fh.write(json.dumps({"text": text}) + "\n")
        paths[name] = data / f"{name}.jsonl"
    chat = data / "chat.jsonl"
    with open(chat, "w", encoding="utf-8") as fh:
        for i in range(12):
            messages = [{"role": "user", "content": f"How do I reset password number {i}?"},
                        {"role": "assistant", "content": f"Open settings, choose security, and reset it ({i})."}]
            fh.write(json.dumps({"messages": messages, "domain": "support"}) + "\n")
    paths["chat"] = chat
    return paths
