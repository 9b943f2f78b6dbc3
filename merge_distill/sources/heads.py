"""A teacher's final hidden states and head instead of its logits, where they give its own logits.

A teacher whose output layer is a bias-free linear head can hand over its final hidden states
[B, T, H] and that head (HeadLogits): rows of logits are then made on demand, one chunk at a
time, and no [B, T, V] tensor is built. Some models rescale what their head gives (Cohere's
logit_scale, Granite's and HyperCLOVA X's logits_scaling, Falcon-H1's lm_head_multiplier); their
logits cannot be made from the head alone. So the first such forward of every teacher is checked:
the model's own logits at each row's last position (which `hidden_before_head` lets through)
must equal the head's. A teacher that fails gives its logits from its own forward from then on.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from merge_distill.losses.fused import HeadLogits
from merge_distill.models import cut_vocab, hidden_before_head, logit_softcap

# The head's float32 logits may differ from a bf16 model's own by its rounding (2^-8 of a value);
# a rescaling by 1% or more is caught.
HEAD_TOLERANCE = 5e-3


def head_reproduces(head_logits: HeadLogits, own_last: Tensor) -> bool:
    """Whether head_logits [B, T, V] equal the model's own logits own_last [B, 1, V] at each row's
    last position, within HEAD_TOLERANCE of their largest magnitude."""
    B, T = head_logits.shape[0], head_logits.shape[1]
    mine = head_logits[torch.arange(B, device=head_logits.device) * T + (T - 1)]
    theirs = own_last[:, -1].float()
    return bool((mine - theirs).abs().max() <= HEAD_TOLERANCE * theirs.abs().max() + 1e-6)


def head_forward(model: nn.Module, inputs: dict[str, Any], vocab_size: int, chunk_tokens: int,
                 verified: dict[int, bool], key: int) -> HeadLogits | None:
    """The teacher's forward on `inputs`, handing over its hidden states and head: HeadLogits
    [B, T, vocab_size], or None where the caller must run the ordinary forward (no bias-free
    linear head, or a model that rescales its head's output). verified[key] records, from the
    first call, whether the head reproduces the model's own logits."""
    if verified.get(key) is False:
        return None
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if not isinstance(head, nn.Linear) or head.bias is not None:
        verified[key] = False
        return None
    with hidden_before_head(model) as head_input:
        own_last = model(**inputs).logits  # [B, 1, V_model]: the model's own logits at the last position
    logits = HeadLogits(head_input[-1], head.weight, vocab_size, logit_softcap(model), chunk_tokens)
    if key not in verified:
        verified[key] = head_reproduces(logits, cut_vocab(own_last, vocab_size))
    return logits if verified[key] else None
