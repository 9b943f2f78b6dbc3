"""The logit-free driver equals the logits driver: loss parts and gradients with respect to the
hidden states and the lm_head weight, for every divergence x blend, with temperature, hard
labels, padded vocabulary rows, soft-capping and several chunks (fp32, 1e-5 relative). The same
for sparse teachers (top-k + tail: the cache, other tokenizers) against the sparse driver."""

from __future__ import annotations

import pytest
import torch

from merge_distill.losses import DIVERGENCES
from merge_distill.losses.chunked import distill_loss
from merge_distill.losses.fused import fused_distill_loss, fused_sparse_distill_loss
from merge_distill.losses.sparse import sparse_distill_loss

B, T, H, V, ROWS, K = 2, 9, 12, 40, 47, 3


def inputs(seed: int):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, T, H, generator=g)
    weight = torch.randn(ROWS, H, generator=g) * 0.5
    teachers = [torch.randn(B, T, V, generator=g) * 2 for _ in range(K)]
    targets = torch.randint(0, V, (B, T), generator=g)
    targets[0, :3] = -100
    targets[1, -1] = -100
    weights = torch.softmax(torch.randn(B, T, K, generator=g), -1)
    weights[1, 2] = 0.0  # a position no teacher weighs: no divergence there
    return hidden, weight, teachers, targets, weights


def both(kind: str, blend: str, temperature: float, w_ce: float, softcap: float | None, seed: int = 0):
    """(fused, reference) as (loss parts, d hidden, d weight); loss = (1 - w) div + w CE."""
    entry = DIVERGENCES.get(kind)
    config = entry.config_cls(kind=kind, temperature=temperature, hard_label_weight=w_ce)
    out = []
    for fused in (True, False):
        hidden, weight, teachers, targets, weights = inputs(seed)
        hidden.requires_grad_(True)
        weight.requires_grad_(True)
        if fused:
            result = fused_distill_loss(hidden, weight, teachers, weights, targets, entry.impl, config, blend,
                                        chunk_tokens=5, vocab_size=V, softcap=softcap)
        else:
            logits = hidden @ weight[:V].T
            if softcap is not None:
                logits = softcap * torch.tanh(logits / softcap)
            result = distill_loss(logits, teachers, weights, targets, entry.impl, config, blend, chunk_tokens=5)
        loss = (1 - w_ce) * result.divergence_sum + w_ce * result.ce_sum
        loss.backward()
        out.append(((float(result.divergence_sum.detach()), float(result.ce_sum.detach()), result.target_entropy_sum),
                    hidden.grad.clone(), weight.grad.clone()))
    return out


def close(a: torch.Tensor, b: torch.Tensor, rel: float = 1e-5) -> bool:
    return float((a - b).abs().max()) <= rel * float(b.abs().max())


@pytest.mark.parametrize("blend", ["mixture", "geometric"])
@pytest.mark.parametrize("kind", sorted(DIVERGENCES.names()))
def test_fused_equals_the_logits_driver(kind, blend):
    (parts, gh, gw), (ref_parts, ref_gh, ref_gw) = both(kind, blend, temperature=2.0, w_ce=0.3, softcap=None)
    assert parts == pytest.approx(ref_parts, rel=1e-5)
    assert close(gh, ref_gh) and close(gw, ref_gw)
    assert torch.equal(gw[V:], torch.zeros(ROWS - V, H))  # padded rows are no tokens: no gradient


@pytest.mark.parametrize("kind", ["forward_kl", "jsd"])
def test_soft_capping_and_temperature_one(kind):
    (parts, gh, gw), (ref_parts, ref_gh, ref_gw) = both(kind, "mixture", temperature=1.0, w_ce=0.0, softcap=3.0)
    assert parts == pytest.approx(ref_parts, rel=1e-5)
    assert close(gh, ref_gh) and close(gw, ref_gw)


@pytest.mark.parametrize("blend", ["mixture", "geometric"])
@pytest.mark.parametrize("softcap", [None, 3.0])
def test_forward_kl_at_temperature_one_from_the_softmax(blend, softcap):
    """Forward KL at T = 1 takes the softmax path in both drivers (the CE from its logsumexp): the
    fused one equals the logits one with a hard-label share, with and without a soft-cap."""
    (parts, gh, gw), (ref_parts, ref_gh, ref_gw) = both("forward_kl", blend, temperature=1.0, w_ce=0.3, softcap=softcap)
    assert parts == pytest.approx(ref_parts, rel=1e-5)
    assert close(gh, ref_gh) and close(gw, ref_gw)


@pytest.mark.parametrize("kind", ["forward_kl", "reverse_kl", "jsd"])
def test_teachers_as_hidden_states_and_heads(kind):
    """The fused teacher side: teachers given as hidden states + head (HeadLogits, padded rows,
    one soft-capped) give the loss and gradients of their logits, and the same gold NLL,
    entropy and argmax."""
    from merge_distill.losses.fused import HeadLogits
    from merge_distill.signals import per_token_stats
    from merge_distill.sources.online import head_token_stats

    g = torch.Generator().manual_seed(5)
    hidden, weight, _, targets, weights = inputs(3)
    heads = [(torch.randn(B, T, 10, generator=g), torch.randn(V + 4, 10, generator=g), cap) for cap in (None, 4.0, None)]
    as_logits = []
    for h, w, cap in heads:
        logits = h @ w[:V].T
        as_logits.append(cap * torch.tanh(logits / cap) if cap else logits)
    lazy = [HeadLogits(h, w, V, cap, chunk_tokens=4) for h, w, cap in heads]
    entry = DIVERGENCES.get(kind)
    config = entry.config_cls(kind=kind, temperature=2.0, hard_label_weight=0.2)
    grads = []
    for teachers in (lazy, as_logits):
        h, w = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
        result = fused_distill_loss(h, w, teachers, weights, targets, entry.impl, config, "mixture", chunk_tokens=5,
                                    vocab_size=V)
        (0.8 * result.divergence_sum + 0.2 * result.ce_sum).backward()
        grads.append((float(result.divergence_sum.detach()), h.grad, w.grad))
    assert grads[0][0] == pytest.approx(grads[1][0], rel=1e-5)
    assert close(grads[0][1], grads[1][1]) and close(grads[0][2], grads[1][2])
    for head, logits in zip(lazy, as_logits):
        nll, ent = head_token_stats(head, targets, chunk_tokens=4)
        ref_nll, ref_ent, _ = per_token_stats(logits.clone(), targets)
        assert torch.allclose(nll, ref_nll, atol=1e-5) and torch.allclose(ent, ref_ent, atol=1e-5)
        assert torch.equal(head.argmax(-1), logits.argmax(-1))


def test_pure_cross_entropy_without_teachers():
    hidden, weight, _, targets, _ = inputs(1)
    config = DIVERGENCES.get("forward_kl").config_cls(kind="forward_kl", hard_label_weight=1.0)
    grads = []
    for fused in (True, False):
        h, w = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
        if fused:
            result = fused_distill_loss(h, w, [], torch.zeros(B, T, 0), targets, DIVERGENCES.get("forward_kl").impl,
                                        config, chunk_tokens=4, vocab_size=V)
        else:
            result = distill_loss(h @ w[:V].T, [], torch.zeros(B, T, 0), targets, DIVERGENCES.get("forward_kl").impl,
                                  config, chunk_tokens=4)
        result.ce_sum.backward()
        grads.append((float(result.ce_sum.detach()), h.grad, w.grad))
    assert grads[0][0] == pytest.approx(grads[1][0], rel=1e-6)
    assert close(grads[0][1], grads[1][1]) and close(grads[0][2], grads[1][2])


def test_bad_shapes_are_refused():
    hidden, weight, teachers, targets, weights = inputs(2)
    entry = DIVERGENCES.get("forward_kl")
    with pytest.raises(ValueError, match="vocab_size"):
        fused_distill_loss(hidden, weight, teachers, weights, targets, entry.impl, entry.config_cls(), vocab_size=99)
    with pytest.raises(ValueError, match="teacher_logits"):
        fused_distill_loss(hidden, weight, teachers, weights, targets, entry.impl, entry.config_cls())


def test_a_fused_run_trains_as_the_logits_run(pico, tmp_path):
    """train.fused_loss end to end (routing by gold NLL, jsd at T = 2, a hard-label share; the
    student and both teachers as hidden states + head): the losses, the routing shares and the
    trained student equal a run that builds the logits, within float rounding."""
    import json

    from conftest import pico_recipe_dict, write_recipe
    from safetensors.torch import load_file

    from merge_distill.engine import run
    from merge_distill.recipe import load_recipe
    from test_resume import quiet

    dirs = []
    for fused in (False, True):
        recipe = pico_recipe_dict(pico, tmp_path / f"run-{fused}", routing={"kind": "ce", "tau": 0.5},
                                  loss={"kind": "jsd", "beta": 0.5, "temperature": 2.0, "hard_label_weight": 0.3})
        recipe["train"].update(steps=3, fused_loss=fused, chunk_tokens=16)
        dirs.append(run(load_recipe(write_recipe(tmp_path / f"r-{fused}.yaml", recipe)), console=quiet()))
    rows = [[json.loads(x) for x in (d / "metrics.jsonl").read_text().splitlines()] for d in dirs]
    for a, b in zip(*rows):
        for key in ("loss", "divergence", "ce"):
            assert b[key] == pytest.approx(a[key], rel=1e-5), key
        assert b["share"] == pytest.approx(a["share"], rel=1e-5)
    plain, fused = (load_file(str(d / "student" / "model.safetensors")) for d in dirs)
    for name in plain:
        assert torch.allclose(fused[name], plain[name], rtol=1e-4, atol=1e-6), name


def sparse_inputs(seed: int, temperature: float, k: int = 6):
    """inputs() with each teacher as top-k log-probs at `temperature` + tail (cache/writer.py's
    topk_targets); teacher 1 keeps fewer entries at some positions (an adaptive k: -inf)."""
    from merge_distill.cache.writer import topk_targets

    hidden, weight, teachers, targets, weights = inputs(seed)
    tops = [{key: x.clone() for key, x in topk_targets(t, k, temperature, chunk_tokens=7).items()} for t in teachers]
    tops[1]["values"][0, 3:6, 4:] = -float("inf")
    return (hidden, weight, [t["ids"] for t in tops], [t["values"] for t in tops], [t["tail"] for t in tops],
            targets, weights)


def both_sparse(kind: str, blend: str, temperature: float, w_ce: float, softcap: float | None, peaked: bool = False):
    """(fused, reference) for sparse teachers, as `both`. peaked: one position's student is so sure
    of a listed token that its mass outside the buckets is below e^-60 (the drivers' tiny-rest rows)."""
    entry = DIVERGENCES.get(kind)
    config = entry.config_cls(kind=kind, temperature=temperature, hard_label_weight=w_ce)
    out = []
    for fused in (True, False):
        hidden, weight, ids, values, tails, targets, weights = sparse_inputs(0, temperature)
        if peaked:
            v = int(ids[0][1, 4, 0])
            weight[v] *= 3.0
            hidden[1, 4] = 40.0 * weight[v]
        hidden.requires_grad_(True)
        weight.requires_grad_(True)
        logits = hidden @ weight[:V].T
        if softcap is not None:
            logits = softcap * torch.tanh(logits / softcap)
        if peaked:
            rest = torch.log_softmax(logits[1, 4].detach() / temperature, -1)
            listed = torch.zeros(V, dtype=torch.bool)
            listed[torch.cat([i[1, 4] for i in ids]).long()] = True
            assert float(torch.logsumexp(rest[~listed], -1)) < -60
        if fused:
            result = fused_sparse_distill_loss(hidden, weight, ids, values, tails, weights, targets, entry.impl, config,
                                               blend, chunk_tokens=5, vocab_size=V, softcap=softcap)
        else:
            result = sparse_distill_loss(logits, ids, values, tails, weights, targets, entry.impl, config, blend,
                                         chunk_tokens=5)
        loss = (1 - w_ce) * result.divergence_sum + w_ce * result.ce_sum
        loss.backward()
        out.append(((float(result.divergence_sum.detach()), float(result.ce_sum.detach()), result.target_entropy_sum),
                    hidden.grad.clone(), weight.grad.clone()))
    return out


@pytest.mark.parametrize("blend", ["mixture", "geometric"])
@pytest.mark.parametrize("kind", sorted(DIVERGENCES.names()))
def test_fused_sparse_equals_the_sparse_driver(kind, blend):
    (parts, gh, gw), (ref_parts, ref_gh, ref_gw) = both_sparse(kind, blend, temperature=2.0, w_ce=0.3, softcap=None)
    assert parts == pytest.approx(ref_parts, rel=1e-5)
    assert close(gh, ref_gh) and close(gw, ref_gw)
    assert torch.equal(gw[V:], torch.zeros(ROWS - V, H))


@pytest.mark.parametrize("kind", ["forward_kl", "reverse_kl", "jsd"])
def test_fused_sparse_soft_capped_and_tiny_rest(kind):
    for softcap, peaked in ((5.0, False), (None, True)):
        (parts, gh, gw), (ref_parts, ref_gh, ref_gw) = both_sparse(kind, "mixture", 1.0, 0.0, softcap, peaked)
        assert parts == pytest.approx(ref_parts, rel=1e-5)
        assert close(gh, ref_gh) and close(gw, ref_gw)


def test_sparse_signals_from_hidden_train_uncovered_positions_on_the_gold_token():
    """SparseSignals.loss_from_hidden equals SparseSignals.loss on the head's logits where some
    positions no teacher covers (weights 0 after `route`: the gold token's CE there)."""
    from merge_distill.sources.signals import LossSetup, SparseSignals, StudentHead

    hidden, weight, ids, values, tails, targets, weights = sparse_inputs(4, temperature=1.0)
    covered = torch.ones(B, T, K, dtype=torch.bool)
    covered[0, 4:7] = False  # no teacher here
    covered[1, 1, 0] = False
    signals = SparseSignals(["a", "b", "c"], ids, values, tails, torch.zeros(B, T, K), torch.zeros(B, T, K), covered)
    routed = signals.route(weights)
    entry = DIVERGENCES.get("forward_kl")
    setup = LossSetup(entry.impl, entry.config_cls(kind="forward_kl"), "mixture", 5)
    results = []
    for fused in (True, False):
        h, w = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
        if fused:
            out = signals.loss_from_hidden(h, StudentHead(w, V, 4.0), routed, targets, setup)
        else:
            out = signals.loss(4.0 * torch.tanh(h @ w[:V].T / 4.0), routed, targets, setup)
        (out.divergence_sum + out.ce_sum).backward()
        results.append((float(out.divergence_sum.detach()), float(out.ce_sum.detach()), out.n_tokens, h.grad, w.grad))
    (div, ce, n, gh, gw), (ref_div, ref_ce, ref_n, ref_gh, ref_gw) = results
    assert n == ref_n == int((targets != -100).sum())
    assert (div, ce) == pytest.approx((ref_div, ref_ce), rel=1e-5)
    assert close(gh, ref_gh) and close(gw, ref_gw)


def sparse_run_metrics(recipe_path, tmp_path, fused: bool, overrides: list[str]):
    """Train `recipe_path` with train.fused_loss on or off -> (metrics rows, student weights)."""
    import json

    from safetensors.torch import load_file

    from merge_distill.engine import run
    from merge_distill.recipe import load_recipe
    from test_resume import quiet

    recipe = load_recipe(recipe_path, [*overrides, f"train.fused_loss={str(fused).lower()}",
                                       f"output.dir={tmp_path / f'run-{fused}'}"])
    run_dir = run(recipe, console=quiet())
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return rows, load_file(str(run_dir / "student" / "model.safetensors"))


def assert_same_training(a, b) -> None:
    # abs: a divergence near 0 (jsd at T = 2: ~7e-4 nats) is a difference of sums of order the
    # entropy (~5 nats); float32 summation order alone moves it by ~1e-8 (AVX2 vs AVX-512 kernels).
    for x, y in zip(a[0], b[0]):
        for key in ("loss", "divergence", "ce"):
            assert y[key] == pytest.approx(x[key], rel=1e-5, abs=1e-7), key
        assert y["share"] == pytest.approx(x["share"], rel=1e-5)
    for name in a[1]:
        assert torch.allclose(b[1][name], a[1][name], rtol=1e-4, atol=1e-6), name


def test_a_fused_run_from_the_cache_trains_as_the_logits_run(cached_recipe, tmp_path):
    """train.fused_loss on the cache (sparse targets, k = 8, routing by gold NLL, jsd at T = 2, a
    hard-label share): the losses, shares and trained student equal the logits run."""
    from merge_distill.cache.writer import write_cache
    from merge_distill.recipe import load_recipe

    path = cached_recipe()
    overrides = ["loss.kind=jsd", "loss.temperature=2.0", "loss.hard_label_weight=0.3", "routing.kind=ce",
                 "train.chunk_tokens=16"]
    write_cache(load_recipe(path, overrides), show_progress=False)
    overrides.append("cache.use=true")
    assert_same_training(*(sparse_run_metrics(path, tmp_path, fused, overrides) for fused in (False, True)))


def test_a_fused_run_across_tokenizers_trains_as_the_logits_run(pico, sp_teacher, tmp_path):
    """train.fused_loss with a SentencePiece teacher beside a byte-level one (sparse targets in the
    student's vocabulary, positions no teacher covers trained on the gold token)."""
    from conftest import pico_recipe_dict, write_recipe

    recipe = pico_recipe_dict(pico, tmp_path / "run", routing={"kind": "ce", "tau": 1.0},
                              loss={"kind": "forward_kl", "temperature": 2.0})
    recipe["teachers"][1]["model"] = str(sp_teacher)
    recipe["align"] = {"k": 16}
    recipe["train"].update(steps=2, chunk_tokens=16)
    path = write_recipe(tmp_path / "r.yaml", recipe)
    assert_same_training(*(sparse_run_metrics(path, tmp_path, fused, []) for fused in (False, True)))


def test_fused_loss_refusals(cached_recipe, monkeypatch, capsys):
    from conftest import run_cli

    code, text = run_cli(["validate", str(cached_recipe()), "train.fused_loss=true", "onpolicy.lmbda=0.5",
                          "distributed.student_zero_stage=3"], monkeypatch, capsys)
    assert code == 2 and "ZeRO-3 student's head" in text and "on-policy micro-batches read" in text


@pytest.mark.parametrize("sparse", [False, True])
def test_bfloat16_inputs_accumulate_in_float32(sparse):
    """bf16 hidden states and head (as on GPU): the loss is computed in float32 from them, equal to
    the logits driver on the same values upcast, and the gradients come back in bf16 within its
    rounding (2^-8 relative)."""
    entry = DIVERGENCES.get("forward_kl")
    config = entry.config_cls(kind="forward_kl", temperature=2.0, hard_label_weight=0.2)
    hidden, weight, ids, values, tails, targets, weights = sparse_inputs(6, temperature=2.0)
    _, _, teachers, _, _ = inputs(6)
    results = []
    for half in (True, False):
        h = hidden.bfloat16() if half else hidden.bfloat16().float()
        w = weight.bfloat16() if half else weight.bfloat16().float()
        h.requires_grad_(True)
        w.requires_grad_(True)
        if half:
            out = (fused_sparse_distill_loss(h, w, ids, values, tails, weights, targets, entry.impl, config,
                                             chunk_tokens=5, vocab_size=V) if sparse else
                   fused_distill_loss(h, w, teachers, weights, targets, entry.impl, config, chunk_tokens=5, vocab_size=V))
        else:
            logits = h @ w[:V].T
            out = (sparse_distill_loss(logits, ids, values, tails, weights, targets, entry.impl, config, chunk_tokens=5)
                   if sparse else distill_loss(logits, teachers, weights, targets, entry.impl, config, chunk_tokens=5))
        (0.8 * out.divergence_sum + 0.2 * out.ce_sum).backward()
        results.append((float(out.divergence_sum.detach()), float(out.ce_sum.detach()), h.grad, w.grad,
                        out.divergence_sum.dtype))
    (div, ce, gh, gw, dtype), (ref_div, ref_ce, ref_gh, ref_gw, _) = results
    assert dtype == torch.float32  # accumulated in float32, not bf16
    assert (div, ce) == pytest.approx((ref_div, ref_ce), rel=1e-5)
    assert gh.dtype == torch.bfloat16 and gw.dtype == torch.bfloat16
    assert close(gh.float(), ref_gh, rel=2**-7) and close(gw.float(), ref_gw, rel=2**-7)
