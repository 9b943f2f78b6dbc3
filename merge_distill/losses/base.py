"""The divergence interface.

A divergence is a pure function of two log-probability tensors over the same (already
temperature-scaled, vocabulary-cut) support:

    fn(student_logprobs [N, V], target_logprobs [N, V], config) -> per-token divergence [N]

It knows nothing of masks, chunks, temperature or normalisation: the chunked driver in
`losses/chunked.py` handles those.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class LossConfigBase(BaseModel):
    """Fields every loss accepts. Subclasses add `kind: Literal["..."]` and their parameters."""

    model_config = ConfigDict(extra="forbid")

    temperature: float = Field(
        1.0, gt=0.0,
        description="Divides student and teacher logits before the softmax; the divergence is multiplied by T^2.",
    )
    hard_label_weight: float = Field(
        0.0, ge=0.0, le=1.0,
        description="loss = (1 - w) * divergence + w * next-token cross-entropy on the gold labels.",
    )
