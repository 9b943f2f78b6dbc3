"""The recipe's `cache:` section (schema only; the cache itself is merge_distill.cache)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class CacheSection(BaseModel):
    """The recipe's `cache:` section."""

    model_config = ConfigDict(extra="forbid")

    dir: str = Field(description="Cache folder (relative to the recipe); `merge-distill cache` writes it.")
    use: bool = Field(False, description="Train from the cache: no teacher is loaded or run. Write the cache first.")
    k: int = Field(64, ge=1, description="Top-k log-probs stored per token and teacher (at most the vocabulary size).")
    dtype: Literal["float16", "bfloat16", "float32"] = Field(
        "float16", description="Storage dtype of the top-k log-probs (ids are int32; tail, NLL and entropy float32).")
    rows_per_shard: int = Field(256, ge=1, description="Source rows per Arrow shard (the unit of resume).")
