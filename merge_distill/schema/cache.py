"""The recipe's `cache:` section (schema only; the cache itself is merge_distill.cache)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class CacheSection(BaseModel):
    """The recipe's `cache:` section."""

    model_config = ConfigDict(extra="forbid")

    dir: str = Field(description="Cache folder (relative to the recipe); `merge-distill cache` writes it.")
    use: bool = Field(False, description="Train from the cache: no teacher is loaded or run. Write the cache first.")
    k: int = Field(40, ge=1, description="Top-k log-probs stored per token and teacher (at most the vocabulary size). "
                   "With the default uint8 values, 40 keeps a token under 150 bytes per teacher for vocabularies up to 262,144.")
    dtype: Literal["float16", "bfloat16", "float32", "uint8"] = Field(
        "uint8", description="Storage of the top-k log-probs: 16- or 32-bit floats, or uint8 (steps of 1/16 nat; "
        "probabilities within 3.2%). Ids are packed to the bits the vocabulary needs; tail, NLL and entropy are float32.")
    mass: float = Field(
        1.0, gt=0, le=1, description="Adaptive k: keep the fewest top entries whose probability reaches this share, "
        "at most k (1.0: always k). The tail holds the rest exactly.")
    store: Literal["auto", "topk", "hidden"] = Field(
        "auto", description="What is stored per token and teacher. topk: the top-k log-probs + tail (any teacher). "
        "hidden: the teacher's final hidden state (int8) and its head once, so a run gets the full distribution back "
        "(teachers on the student's tokenizer with a plain linear head; H + 12 bytes per token). auto: hidden where "
        "that takes at most 150 bytes or no more than the top-k would, else topk.")
    rows_per_shard: int = Field(256, ge=1, description="Source rows per Arrow shard (the unit of resume).")
