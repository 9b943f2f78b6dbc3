"""The bytes of every token of a tokenizer: what cross-tokenizer alignment compares.

Two families of tokenizers spell text differently in their vocabularies:

    byte-level BPE (GPT-2, SmolLM2, Llama 3, Qwen)   every byte is a printable stand-in character
                                                     ("Ġ" is the space byte 0x20); a token may be
                                                     part of a multi-byte UTF-8 character
    SentencePiece (Llama 2, Gemma, Mistral)          "▁" is a space; bytes outside the vocabulary
                                                     are <0xNN> byte-fallback tokens; a dummy "▁"
                                                     may be put before the first word

`TokenBytes` turns any id into the exact bytes it stands for, so a row of token ids becomes the
byte string of its text and every token a byte span of it, whatever the family. Special tokens
(BOS, EOS, chat markers registered as special) stand for no text: zero bytes. A tokenizer of
another family (WordPiece's "##", a slow tokenizer without tokenizer.json) is refused with the
reason, and so is one whose normaliser changes the text (lowercasing, NFKC), checked on a probe.
"""

from __future__ import annotations

import json
import re
from functools import lru_cache

import torch
from transformers import PreTrainedTokenizerBase

from merge_distill.errors import UserError

SPACE_MARK = "▁"
_BYTE_FALLBACK = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")
# A probe for `check`: spaces, indentation, digits, accents, CJK and an emoji.
PROBE = "def F(x):\n    return X * 12345  # Café 東京 🙂\n\tDone"


@lru_cache(maxsize=1)
def byte_decoder() -> dict[str, int]:
    """GPT-2's printable stand-in character of every byte -> the byte."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars = printable[:]
    n = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(printable, chars)}


def tokenizer_family(tokenizer: PreTrainedTokenizerBase) -> str:
    """'byte_level' or 'sentencepiece', read from the fast tokenizer's own JSON; UserError otherwise."""
    if not getattr(tokenizer, "is_fast", False):
        raise UserError(f"{tokenizer.name_or_path}: a slow tokenizer cannot give the bytes of its tokens; save a fast "
                        "one (tokenizer.json) next to the model (AutoTokenizer.from_pretrained(..., use_fast=True)"
                        ".save_pretrained(folder))")
    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    text = json.dumps([spec.get("decoder"), spec.get("pre_tokenizer")])
    if '"ByteLevel"' in text:
        return "byte_level"
    if SPACE_MARK in text or '"ByteFallback"' in text or '"Metaspace"' in text:
        return "sentencepiece"
    decoder = (spec.get("decoder") or {}).get("type", "none")
    raise UserError(f"{tokenizer.name_or_path}: tokenizers with a {decoder} decoder are not supported across "
                    "tokenizers (byte-level BPE and SentencePiece are); use a teacher with such a tokenizer")


class TokenBytes:
    """id -> bytes for one tokenizer (a table built once; 262k entries take about a second)."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase):
        self.tokenizer = tokenizer
        self.family = tokenizer_family(tokenizer)
        special = set(tokenizer.all_special_ids)
        added = tokenizer.added_tokens_decoder  # a property that builds a new dict on every access: read once
        special |= {i for i, tok in added.items() if tok.special}
        vocab = tokenizer.get_vocab()
        self.table: list[bytes] = [b""] * (max(vocab.values()) + 1)
        decoder = byte_decoder()
        for token, i in vocab.items():
            if i in special:
                continue
            if i in added:  # a non-special added token is its literal text
                self.table[i] = token.encode("utf-8")
            elif self.family == "byte_level":
                self.table[i] = bytes(decoder[c] for c in token) if all(c in decoder for c in token) else token.encode()
            else:
                fallback = _BYTE_FALLBACK.match(token)
                self.table[i] = bytes([int(fallback.group(1), 16)]) if fallback else token.replace(SPACE_MARK, " ").encode()
        self.special = special
        # byte length of every id's piece ([len(table)] long): row byte counts as one gather
        self.lengths = torch.tensor([len(piece) for piece in self.table], dtype=torch.long)
        # What the tokenizer puts around a text of its own (e.g. [BOS] before it): a document start.
        probe = self.tokenizer("a", add_special_tokens=True)["input_ids"]
        plain = self.tokenizer("a", add_special_tokens=False)["input_ids"]
        self.prefix: list[int] = probe[: probe.index(plain[0])] if plain and plain[0] in probe else []
        self.pad_id: int = next((i for i in (tokenizer.pad_token_id, tokenizer.eos_token_id) if i is not None), 0)

    def __call__(self, ids: list[int]) -> list[bytes]:
        return [self.table[i] if 0 <= i < len(self.table) else b"" for i in ids]

    def encode(self, text: str, special_tokens: bool = True) -> tuple[list[int], list[bytes]]:
        """text -> (ids, with the tokenizer's special tokens if `special_tokens`, and the bytes of the
        text each token covers). The pieces concatenate to the text's UTF-8 exactly: a special token
        covers b"", and SentencePiece's dummy prefix space is taken off the first word. Raises
        ValueError when the tokens' bytes do not spell the text (a normalising tokenizer)."""
        ids = self.tokenizer(text, add_special_tokens=special_tokens)["input_ids"]
        pieces = self(ids)
        target = text.encode("utf-8")
        joined = b"".join(pieces)
        if joined != target and self.family == "sentencepiece" and joined == b" " + target:
            first = next(k for k, p in enumerate(pieces) if p)  # the dummy prefix space is not in the text
            pieces[first] = pieces[first][1:]
            joined = target
        if joined != target:
            raise ValueError("the tokens do not spell the text back")
        return ids, pieces

    def check(self, label: str) -> list[str]:
        """Problems that stop this tokenizer from aligning across tokenizers, in recipe words."""
        try:
            self.encode(PROBE)
        except ValueError:
            return [f"{label}: its tokenizer changes the text it encodes (a normaliser such as lowercasing or "
                    "NFKC), so its tokens cannot be placed on the text's bytes; use a teacher whose tokenizer "
                    "keeps the text as it is"]
        return []


def special_counterparts(source: TokenBytes, target: TokenBytes) -> dict[int, int]:
    """source's special ids -> target's special token of the same role (BOS, EOS) or else of the
    same name. A special token without a counterpart is absent (it has none in the target)."""
    names = {target.tokenizer.convert_ids_to_tokens(i): i for i in target.special}
    out = {i: names[name] for i in source.special if (name := source.tokenizer.convert_ids_to_tokens(i)) in names}
    for role in ("bos_token_id", "eos_token_id"):
        a, b = getattr(source.tokenizer, role), getattr(target.tokenizer, role)
        if a is not None and b is not None:
            out[a] = b
    return out
