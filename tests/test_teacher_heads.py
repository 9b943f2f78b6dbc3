"""A teacher's hidden states + head instead of its logits (merge_distill/sources/heads.py): used only
where the head gives the model's own logits."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from merge_distill.cache.writer import check_heads
from merge_distill.errors import UserError
from merge_distill.losses.fused import HeadLogits
from merge_distill.signals import TokenBatch
from merge_distill.sources import OnlineTeachers
from merge_distill.sources.heads import head_forward


def rescaled(model, scale: float):
    """The model with its output logits multiplied by `scale` after its head, as Cohere's
    logit_scale does; returns the hook's handle."""
    def scale_logits(module, args, output):
        output.logits = output.logits * scale
        return output
    return model.register_forward_hook(scale_logits)


def inputs_for(model, rows: int = 3, length: int = 12) -> dict:
    ids = torch.randint(0, model.config.vocab_size, (rows, length), generator=torch.Generator().manual_seed(0))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "use_cache": False}


def test_a_plain_head_hands_over_hidden_states_that_give_the_models_logits(pico) -> None:
    model = AutoModelForCausalLM.from_pretrained(pico["teacher_a"]).eval()
    inputs, vocab = inputs_for(model), model.config.vocab_size - 8  # the tokenizer's size: padded rows cut
    verified: dict[int, bool] = {}
    with torch.no_grad():
        head = head_forward(model, inputs, vocab, 16, verified, 0)
        own = model(**inputs).logits[..., :vocab]
    assert isinstance(head, HeadLogits) and verified == {0: True}
    rows = torch.arange(own.shape[0] * own.shape[1])
    assert torch.allclose(head[rows].view(own.shape), own, atol=1e-5)


def test_a_model_that_rescales_its_heads_output_gives_its_own_logits(pico) -> None:
    """Logits multiplied by 0.25 after the head: the first forward's check fails, and from then
    on the teacher runs its ordinary forward only (the caller's), never the head path."""
    model = AutoModelForCausalLM.from_pretrained(pico["teacher_a"]).eval()
    rescaled(model, 0.25)
    forwards = []
    model.register_forward_pre_hook(lambda *_: forwards.append(1))
    verified: dict[int, bool] = {}
    with torch.no_grad():
        assert head_forward(model, inputs_for(model), model.config.vocab_size, 16, verified, 0) is None
        assert verified == {0: False} and len(forwards) == 1
        assert head_forward(model, inputs_for(model), model.config.vocab_size, 16, verified, 0) is None
    assert len(forwards) == 1  # no second forward for a head known not to give the logits


def test_online_fused_teachers_that_rescale_their_logits_give_logits(pico) -> None:
    """train.fused_loss: a plain teacher hands over HeadLogits, a rescaling one its own logits
    (with the scale), so the signals hold the distribution the model gives."""
    plain = AutoModelForCausalLM.from_pretrained(pico["teacher_a"]).eval()
    scaled = AutoModelForCausalLM.from_pretrained(pico["teacher_b"]).eval()
    reference = AutoModelForCausalLM.from_pretrained(pico["teacher_b"]).eval()
    rescaled(scaled, 0.25)
    vocab = plain.config.vocab_size - 8
    source = OnlineTeachers(["a", "b"], [plain, scaled], vocab, chunk_tokens=16, fused_heads=True)
    ids = inputs_for(plain)["input_ids"].clamp_max(vocab - 1)
    batch = TokenBatch(ids, torch.ones_like(ids), ids, ["code"] * 3, ["x"] * 3)
    signals = source.signals(batch)
    assert isinstance(signals.logits[0], HeadLogits) and isinstance(signals.logits[1], torch.Tensor)
    with torch.no_grad():
        want = torch.log_softmax(0.25 * reference(input_ids=ids).logits[..., :vocab].float(), -1)
    got = torch.log_softmax(signals.logits[1].float(), -1)
    assert torch.allclose(got, want, atol=1e-5)
    # so `cache.store: hidden` (which stores the head's input) refuses that teacher, naming the key
    with pytest.raises(UserError, match="teacher 'b' .*rescales.*set cache.store: topk"):
        check_heads(signals.names, signals.logits)
