"""How the cache stores one teacher's top-k per position, compactly.

Per row (seq_len positions) and teacher a shard holds:
- `n`: entries kept per position (only with an adaptive k, `cache.mass` < 1): the fewest top
  entries whose probability reaches `mass`, at most k; uint8 (k <= 255) or uint16 [T];
- `ids`: the kept entries' token ids, position after position, packed to the bits the
  vocabulary needs (ceil(log2 V): 12 for 4,096 tokens, 16 for 49,152, 18 for 262,144);
- `values`: their log-probs, in `cache.dtype`: float16 / bfloat16 / float32 bytes, or uint8,
  a fixed-step quantisation of the log-prob, q = round(-log p x 16), clipped at 255. Its step
  is 1/16 nat, so each probability is kept within 3.2% relative. Log-probs below -15.9 are
  stored as -15.9 (p = 1.2e-7).
- the tail (log of the mass outside the kept entries) is exact float32, whatever is kept.

`decode` gives back fixed [T, k] arrays: missing entries repeat the position's first id with a
log-prob of -inf, which lists nothing (losses/sparse.py spreads the tail over V - n).

With `cache.store: hidden` a shard holds instead, per row and teacher, the teacher's final hidden
state at every position (the input of its lm_head) as int8, with one float32 scale per position
(absmax / 127: each entry within half a step, 0.4% of the position's largest), and the head
weight once per teacher (writer.py). A run makes the logits h W^T chunk by chunk: the full
distribution, not a top-k, at H + 4 + 8 bytes per token (scale, NLL, entropy).
"""

from __future__ import annotations

import numpy as np
import torch

QUANT_STEP = 1.0 / 16.0  # nats per uint8 step
VALUE_BYTES = {"float16": 2, "bfloat16": 2, "float32": 4, "uint8": 1}
_FLOAT_VIEWS = {"float16": (torch.float16, np.int16), "bfloat16": (torch.bfloat16, np.int16), "float32": (torch.float32, np.float32)}


def id_bits(vocab_size: int) -> int:
    return max(1, (vocab_size - 1).bit_length())


def count_dtype(k: int) -> type[np.unsignedinteger]:
    return np.uint8 if k <= 255 else np.uint16


def bytes_per_token(k: float, dtype: str, vocab_size: int, adaptive: bool, aligned: bool) -> float:
    """Stored bytes per token per teacher with (mean) k entries kept: ids at id_bits, values,
    the count when adaptive, tail + NLL + entropy (float32), the span when aligned (int32)."""
    entries = k * (id_bits(vocab_size) / 8 + VALUE_BYTES[dtype])
    return entries + (np.dtype(count_dtype(int(k))).itemsize if adaptive else 0) + 12 + (4 if aligned else 0)


def bytes_per_token_hidden(hidden_size: int) -> int:
    """Stored bytes per token per teacher with `cache.store: hidden`: int8 entries, their float32
    scale, NLL + entropy (float32)."""
    return hidden_size + 4 + 8


def encode_hidden(hidden: torch.Tensor) -> tuple[list[bytes], np.ndarray]:
    """Hidden states [B, T, H] (any float dtype) -> per row T * H int8 bytes, and scales [B, T]
    float32 (absmax / 127; 1 where a position is all zeros)."""
    h = hidden.float()
    scale = h.abs().amax(-1) / 127.0
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = torch.round(h / scale.unsqueeze(-1)).clamp_(-127, 127).to(torch.int8)
    return [row.numpy().tobytes() for row in q], scale.numpy()


def decode_hidden(data: bytes, scale: np.ndarray, hidden_size: int) -> torch.Tensor:
    """Inverse of encode_hidden for one row -> [T, H] float32."""
    q = torch.from_numpy(np.frombuffer(data, np.int8).astype(np.float32)).view(-1, hidden_size)
    return q * torch.from_numpy(scale.astype(np.float32)).unsqueeze(-1)


def kept_counts(values: torch.Tensor, mass: float) -> torch.Tensor:
    """values: top-k log-probs [N, k], largest first -> entries to keep [N] (1 .. k): the fewest
    whose summed probability reaches `mass`; k when mass >= 1."""
    k = values.shape[-1]
    if mass >= 1.0:
        return torch.full(values.shape[:-1], k, dtype=torch.long)
    before = values.float().exp().cumsum(-1) - values.float().exp()  # mass of the entries above each one
    return (before < mass).sum(-1).clamp(1, k)


def kept_tail(values: torch.Tensor, tail: torch.Tensor, n: torch.Tensor) -> torch.Tensor:
    """The tail once only the first n of k entries are kept: logaddexp of the k-entry tail and the
    dropped entries' log-probs [N] (exact: no 1 - sum)."""
    k = values.shape[-1]
    dropped = torch.where(torch.arange(k)[None, :] >= n[:, None], values.float(), torch.tensor(-torch.inf))
    return torch.logaddexp(tail.float(), torch.logsumexp(dropped, dim=-1))


def pack_ids(ids: np.ndarray, bits: int) -> bytes:
    """Non-negative ids [n] -> ceil(n * bits / 8) bytes, least significant bit first."""
    planes = ((ids.astype(np.int64)[:, None] >> np.arange(bits)) & 1).astype(np.uint8)
    return np.packbits(planes.reshape(-1), bitorder="little").tobytes()


def unpack_ids(data: bytes, n: int, bits: int) -> np.ndarray:
    """Inverse of pack_ids -> int64 [n]. Id i starts at bit i * bits: the ceil((bits + 7) / 8)
    bytes from there, read as one little-endian integer, shifted and masked (no per-bit work)."""
    raw = np.frombuffer(data, np.uint8)
    padded = np.zeros(len(raw) + 5, np.uint64)
    padded[: len(raw)] = raw
    start = np.arange(n, dtype=np.int64) * bits
    byte, shift = start // 8, (start % 8).astype(np.uint64)
    word = np.zeros(n, np.uint64)
    for j in range((bits + 7 + 7) // 8):  # shift <= 7, so shift + bits bits hold the id
        word |= padded[byte + j] << np.uint64(8 * j)
    return ((word >> shift) & np.uint64((1 << bits) - 1)).astype(np.int64)


def encode_values(values: torch.Tensor, dtype: str) -> bytes:
    """Log-probs (float32, any shape) -> bytes in the storage dtype."""
    if dtype == "uint8":
        return torch.round(-values.float() / QUANT_STEP).clamp(0, 255).to(torch.uint8).numpy().tobytes()
    torch_dtype, np_view = _FLOAT_VIEWS[dtype]
    stored = values.to(torch_dtype)
    return (stored.view(torch.int16) if np_view is np.int16 else stored).numpy().tobytes()


def decode_values(data: bytes, dtype: str) -> torch.Tensor:
    """Bytes -> float32 log-probs [n]."""
    if dtype == "uint8":
        return torch.from_numpy(np.frombuffer(data, np.uint8).astype(np.float32)) * -QUANT_STEP
    torch_dtype, np_view = _FLOAT_VIEWS[dtype]
    raw = torch.from_numpy(np.frombuffer(data, np_view).copy())
    return (raw.view(torch_dtype) if np_view is np.int16 else raw).float()


def encode_row(ids: torch.Tensor, values: torch.Tensor, n: torch.Tensor, dtype: str, bits: int) -> tuple[bytes, bytes]:
    """One row of one teacher: ids / values [T, k], kept counts n [T] -> (ids bytes, values bytes)."""
    keep = torch.arange(ids.shape[-1])[None, :] < n[:, None]
    return pack_ids(ids[keep].numpy(), bits), encode_values(values[keep], dtype)


def decode_row(ids_bytes: bytes, values_bytes: bytes, n: np.ndarray, k: int, dtype: str, bits: int
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """Inverse of encode_row -> ids [T, k] int64, values [T, k] float32 (-inf past n)."""
    counts = torch.from_numpy(n.astype(np.int64))
    total = int(counts.sum())
    flat_ids = torch.from_numpy(unpack_ids(ids_bytes, total, bits))
    if total == len(counts) * k:  # every position keeps k entries: no padding to place
        return flat_ids.view(len(counts), k), decode_values(values_bytes, dtype).view(len(counts), k)
    keep = torch.arange(k)[None, :] < counts[:, None]
    ids = torch.zeros(len(counts), k, dtype=torch.long)
    values = torch.full((len(counts), k), -torch.inf)
    ids[keep] = flat_ids
    values[keep] = decode_values(values_bytes, dtype)
    ids = torch.where(keep, ids, ids[:, :1])  # padding repeats the first id, at -inf: it lists nothing
    return ids, values
