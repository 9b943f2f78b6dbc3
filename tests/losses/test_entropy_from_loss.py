"""One teacher and a router that does not read entropy: the online source leaves the teacher's
entropy to the loss, which computes the target's entropy anyway. What it fills in must equal the
signals' own pass, and where the loss cannot fill it (another divergence, a row at weight 0) the
usual pass runs after the loss."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from merge_distill.losses import DIVERGENCES
from merge_distill.signals import TokenBatch
from merge_distill.sources.online import OnlineTeachers
from merge_distill.sources.signals import LossSetup


@pytest.mark.parametrize("case", ["forward_kl", "reverse_kl", "weight_0", "temperature_2"])
def test_the_entropy_the_loss_fills_in_equals_the_signals_pass(pico, case: str) -> None:
    teacher = AutoModelForCausalLM.from_pretrained(pico["teacher_a"]).eval()
    V = teacher.config.vocab_size
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, V, (3, 24), generator=g)
    labels = ids.clone()
    labels[1, 20:] = -100
    batch = TokenBatch(ids, torch.ones_like(ids), labels, ["code"] * 3, ["s"] * 3)
    eager_source = OnlineTeachers(["code"], [teacher], V, chunk_tokens=16)
    lazy_source = OnlineTeachers(["code"], [teacher], V, chunk_tokens=16)
    lazy_source.entropy_from_loss = True
    eager, lazy = eager_source.signals(batch), lazy_source.signals(batch)
    assert lazy.entropy_pending and not eager.entropy_pending and (lazy.entropy == 0).all()
    assert (eager.entropy[batch.targets != -100] > 0).all()

    targets = batch.targets
    weights = (targets != -100).float().unsqueeze(-1)
    if case == "weight_0":
        weights[0, 3] = 0.0
    name = "reverse_kl" if case == "reverse_kl" else "forward_kl"
    config = DIVERGENCES.get(name).config_cls(temperature=2.0 if case == "temperature_2" else 1.0)
    setup = LossSetup(DIVERGENCES.get(name).impl, config, "mixture", 16)
    student = torch.randn(3, 24, V, generator=g)
    outs = []
    for signals in (eager, lazy):
        logits = student.clone().requires_grad_()
        out = signals.loss(logits, weights, targets, setup)
        out.divergence_sum.backward()
        outs.append((out, logits.grad))
    (ref, ref_grad), (out, grad) = outs
    assert out.teacher_entropy_filled == (case == "forward_kl")
    assert not lazy.entropy_pending
    torch.testing.assert_close(lazy.entropy, eager.entropy, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(out.divergence_sum, ref.divergence_sum, rtol=1e-6, atol=0.0)
    assert out.target_entropy_sum == pytest.approx(ref.target_entropy_sum, rel=1e-6)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("teachers,routing,expected", [(1, "uniform", True), (1, "entropy", False), (2, "uniform", False)])
def test_training_leaves_the_entropy_to_the_loss_only_where_nothing_reads_it_first(
        pico, tmp_path, teachers: int, routing: str, expected: bool) -> None:
    from conftest import pico_recipe_dict, write_recipe

    from merge_distill.engine import setup_run
    from merge_distill.recipe import load_recipe

    recipe = pico_recipe_dict(pico, tmp_path / "run", routing={"kind": routing})
    recipe["teachers"] = recipe["teachers"][:teachers]
    parts = setup_run(load_recipe(write_recipe(tmp_path / "r.yaml", recipe)), overwrite=True)
    assert parts.training.source.entropy_from_loss is expected
