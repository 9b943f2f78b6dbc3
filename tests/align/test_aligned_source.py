"""Teachers with other tokenizers through the training path (sources/aligned.py)."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import pico_recipe_dict, write_recipe
from e2e import run_and_check
from merge_distill.distributed import accelerator_for
from merge_distill.losses import DIVERGENCES
from merge_distill.models import load_tokenizer
from merge_distill.plan import training_rows
from merge_distill.recipe import load_recipe
from merge_distill.signals import IGNORE_INDEX, TokenBatch
from merge_distill.sources import AlignedTeachers, LossSetup, OnlineTeachers, training_source


def packed_batch(recipe, tokenizer, rows: int = 3) -> TokenBatch:
    """The first `rows` training rows that pack two documents (an EOS inside the row)."""
    source = training_rows(recipe, tokenizer)[0]
    every = source.take(slice(0, len(source)))
    eos = tokenizer.eos_token_id
    keep = [i for i in range(len(source)) if eos in every.input_ids[i, 1:-1].tolist()][:rows]
    assert len(keep) == rows
    ids, labels, mask = source.take(keep)
    return TokenBatch(ids, mask, labels, [source.domain] * rows, [source.label] * rows)


@pytest.mark.parametrize("kind", ["forward_kl", "reverse_kl", "jsd", "skew_kl", "tvd"])
@pytest.mark.parametrize("blend", ["mixture", "geometric"])
def test_identity_same_tokenizer_forced_through_the_cross_path(pico, tmp_path, kind, blend) -> None:
    """Same tokenizer, forced through alignment + projection at k = V: loss and gradient equal the
    same-tokenizer path within 1e-6, on rows that pack documents (EOS targets included)."""
    base = pico_recipe_dict(pico, tmp_path / "run", loss={"kind": kind, "temperature": 2.0},
                            routing={"kind": "uniform", "blend": blend})
    tokenizer = load_tokenizer(str(pico["student"]))
    plain = load_recipe(write_recipe(tmp_path / "plain.yaml", base))
    forced = load_recipe(write_recipe(tmp_path / "forced.yaml", {**base, "align": {"force": True, "k": len(tokenizer)}}))
    assert training_source(forced).name == "aligned" and training_source(plain).name == "online"
    accelerator = accelerator_for(plain)
    online = OnlineTeachers.open(plain, accelerator, len(tokenizer))
    aligned = AlignedTeachers.open(forced, accelerator, tokenizer)
    batch = packed_batch(plain, tokenizer)
    targets = batch.targets
    mask = targets != IGNORE_INDEX
    weights = torch.where(mask.unsqueeze(-1), torch.full((*mask.shape, 2), 0.5), torch.zeros(*mask.shape, 2))
    setup = LossSetup(DIVERGENCES.get(kind).impl, plain.loss, blend, 16)
    results = []
    for source in (online, aligned):
        signals = source.signals(batch)
        logits = torch.randn(*targets.shape, len(tokenizer), generator=torch.Generator().manual_seed(0)).requires_grad_()
        out = signals.loss(logits, signals.route(weights), targets, setup)
        (out.divergence_sum + out.ce_sum).backward()
        results.append((out, logits.grad, signals))
    (dense, g_dense, s_dense), (cross, g_cross, s_cross) = results
    assert cross.n_tokens == dense.n_tokens == int(mask.sum())
    assert float(cross.divergence_sum.detach()) == pytest.approx(float(dense.divergence_sum.detach()), rel=1e-6, abs=1e-6)
    assert float(cross.ce_sum.detach()) == pytest.approx(float(dense.ce_sum.detach()), rel=1e-6)
    assert torch.allclose(g_cross, g_dense, rtol=1e-5, atol=1e-6)
    assert bool(s_cross.covered[mask].all())  # the same tokenizer covers every position with a target
    # routers see NLL per byte of the teacher's next token: times its bytes, the per-token NLL
    nbytes = torch.tensor([[len(p) for p in aligned.student_bytes(row[1:].tolist())] + [0] for row in batch.input_ids],
                          dtype=torch.float32)
    assert torch.allclose((s_cross.gold_nll * nbytes.clamp_min(1).unsqueeze(-1))[mask], s_dense.gold_nll[mask], rtol=1e-5)


def test_a_sentencepiece_teacher_beside_a_byte_level_one_trains_end_to_end(pico, sp_teacher, tmp_path) -> None:
    recipe = pico_recipe_dict(pico, tmp_path / "run", routing={"kind": "ce", "tau": 1.0},
                              loss={"kind": "jsd", "beta": 0.5, "temperature": 2.0})
    recipe["teachers"][1]["model"] = str(sp_teacher)
    recipe["align"] = {"k": 16}
    loaded = load_recipe(write_recipe(tmp_path / "r.yaml", recipe))
    assert training_source(loaded).name == "aligned"
    run_dir, rows = run_and_check(loaded)
    assert len(rows) == 3 and all(0 < r["share"]["prose"] < 1 for r in rows)
    stats = json.loads((run_dir / "stats.json").read_text())
    assert stats["tokens"] > 0 and set(stats["overall"]) == {"code", "prose"}
    code, prose = stats["overall"]["code"], stats["overall"]["prose"]
    assert code["aligned"] == 1.0 and 0.3 < prose["aligned"] < 1.0  # the other tokenizer's boundaries differ
    assert code["bytes_per_token"] > 1.0 and prose["bytes_per_token"] > 1.0
    import io

    from rich.console import Console

    from merge_distill.report.build import load_report
    from merge_distill.report.render import render_report

    out = io.StringIO()
    render_report(load_report(run_dir), Console(file=out, width=200, no_color=True))
    assert "Alignment across tokenizers" in out.getvalue() and "aligned" in out.getvalue()


def test_on_policy_samples_are_graded_across_tokenizers(pico, sp_teacher, tmp_path) -> None:
    """Every micro-batch on-policy at temperature 2 (a pico student samples byte tokens in any
    order, so its rows are not always UTF-8): the SentencePiece teacher grades the sampled tokens
    it aligns, and counts only those in its reverse KL."""
    recipe = pico_recipe_dict(pico, tmp_path / "run", routing={"kind": "ce", "tau": 1.0}, loss={"kind": "reverse_kl"},
                              onpolicy={"lmbda": 1.0, "temperature": 2.0, "max_new_tokens": 12, "prompt_tokens": 8})
    recipe["teachers"][1]["model"] = str(sp_teacher)
    recipe["align"] = {"k": 16}
    run_dir, rows = run_and_check(load_recipe(write_recipe(tmp_path / "r.yaml", recipe)))
    for r in rows:
        on = r["on_policy"]
        assert on["tokens"] == r["tokens"] > 0
        # code shares the student's tokenizer and covers every sampled token: the weights sum to 1 there
        assert on["share"]["code"] + on["share"]["prose"] == pytest.approx(1.0) and 0 < on["share"]["prose"] < 1
        assert on["reverse_kl"]["code"] > 0 and on["reverse_kl"]["prose"] > 0


def test_positions_no_teacher_covers_train_on_the_gold_token(pico, sp_teacher, tmp_path) -> None:
    """Route with coverage: an uncovered teacher weighs 0, the rest renormalised; where no teacher
    covers a position its loss is the cross-entropy of the gold token."""
    recipe = pico_recipe_dict(pico, tmp_path / "run")
    recipe["teachers"] = [{"name": "sp", "model": str(sp_teacher)}]
    loaded = load_recipe(write_recipe(tmp_path / "r.yaml", recipe))
    tokenizer = load_tokenizer(str(pico["student"]))
    source = AlignedTeachers.open(loaded, accelerator_for(loaded), tokenizer)
    batch = packed_batch(loaded, tokenizer, rows=2)
    signals = source.signals(batch)
    targets = batch.targets
    mask = targets != IGNORE_INDEX
    weights = torch.where(mask.unsqueeze(-1), torch.ones(*mask.shape, 1), torch.zeros(*mask.shape, 1))
    routed = signals.route(weights)
    uncovered = mask & ~signals.covered[..., 0]
    assert bool(uncovered.any()) and bool((mask & signals.covered[..., 0]).any())
    assert bool((routed[uncovered] == 0).all()) and bool((routed[mask & ~uncovered] == 1).all())
    logits = torch.randn(*targets.shape, len(tokenizer), generator=torch.Generator().manual_seed(1)).requires_grad_()
    setup = LossSetup(DIVERGENCES.get("forward_kl").impl, loaded.loss, "mixture", 16)
    out = signals.loss(logits, routed, targets, setup)
    assert out.n_tokens == int(mask.sum())
    gold = torch.nn.functional.cross_entropy(logits[uncovered], targets[uncovered], reduction="sum")
    kept = targets.masked_fill(uncovered, IGNORE_INDEX)
    alone = signals.loss(logits, torch.where(uncovered.unsqueeze(-1), torch.zeros_like(routed), routed), kept, setup)
    assert float(out.divergence_sum.detach()) == pytest.approx(float((alone.divergence_sum + gold).detach()), rel=1e-5)


def test_eval_reports_bits_per_byte_for_every_teacher_whatever_its_tokenizer(pico, sp_teacher, tmp_path) -> None:
    """bits per byte: a plain reference (each row's text, the model's own tokens, summed cross-entropy
    over the tokens that spell text, / bytes / ln 2) for the SentencePiece teacher and the student;
    perplexity only for models that share the student's tokenizer."""
    import math

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from merge_distill.align import TokenBytes
    from merge_distill.evaluate import eval_rows, evaluate_run

    evals = [{"type": "jsonl", "path": str(pico["prose"]), "domain": "prose", "max_examples": 2}]
    recipe = pico_recipe_dict(pico, tmp_path / "run")
    recipe["teachers"][1]["model"] = str(sp_teacher)
    recipe["data"]["eval"] = evals
    recipe["data"]["eval_tokens"] = 100
    loaded = load_recipe(write_recipe(tmp_path / "r.yaml", recipe))
    tokenizer = load_tokenizer(str(pico["student"]))
    student = AutoModelForCausalLM.from_pretrained(pico["student"]).eval()
    result = evaluate_run(loaded, accelerator_for(loaded), student, tokenizer)
    rows = {r["model"]: r for r in result["rows"]}
    assert set(rows) == {"student", "code", "prose"}
    assert rows["prose"]["ppl"] == {} and "prose" in rows["code"]["ppl"] and "prose" in rows["student"]["ppl"]

    ids, labels, mask = eval_rows(loaded, tokenizer)["prose"]
    student_bytes = TokenBytes(tokenizer)
    sp_tok = AutoTokenizer.from_pretrained(sp_teacher)
    sp_bytes = TokenBytes(sp_tok)
    teacher = AutoModelForCausalLM.from_pretrained(sp_teacher).eval()
    totals = {"student": [0.0, 0], "prose": [0.0, 0]}
    with torch.no_grad():
        for row in ids:
            row = row.tolist()
            logp = torch.log_softmax(student(torch.tensor([row])).logits[0, :, : len(tokenizer)].float(), -1)
            for t in range(len(row) - 1):
                width = len(student_bytes([row[t + 1]])[0])
                if width:
                    totals["student"][0] -= float(logp[t, row[t + 1]])
                    totals["student"][1] += width
            text = b"".join(student_bytes(row)).decode("utf-8", errors="ignore")
            t_ids, pieces = sp_bytes.encode(text)
            logp = torch.log_softmax(teacher(torch.tensor([t_ids])).logits[0, :, : len(sp_tok)].float(), -1)
            for j in range(len(t_ids) - 1):
                if pieces[j + 1]:
                    totals["prose"][0] -= float(logp[j, t_ids[j + 1]])
                    totals["prose"][1] += len(pieces[j + 1])
    for model, (nll, nbytes) in totals.items():
        assert rows[model]["bpb"]["prose"] == pytest.approx(nll / (nbytes * math.log(2)), rel=1e-4), model


def test_padded_embedding_rows_of_a_teacher_with_another_tokenizer_never_reach_the_softmax(pico, sp_teacher,
                                                                                           tmp_path) -> None:
    """The SentencePiece teacher has 8 embedding rows beyond its tokenizer (as Qwen's 151936 vs
    152064): enormous logits there change nothing, because its logits are cut to its own size."""
    recipe = pico_recipe_dict(pico, tmp_path / "run")
    recipe["teachers"] = [{"name": "sp", "model": str(sp_teacher)}]
    loaded = load_recipe(write_recipe(tmp_path / "r.yaml", recipe))
    tokenizer = load_tokenizer(str(pico["student"]))
    source = AlignedTeachers.open(loaded, accelerator_for(loaded), tokenizer)
    model = source.models[0]
    assert model.lm_head.weight.shape[0] == source.vocab_sizes[0] + 8
    batch = packed_batch(loaded, tokenizer, rows=2)
    before = source.signals(batch)
    with torch.no_grad():
        model.lm_head.weight[source.vocab_sizes[0]:] = 1e3
    after = source.signals(batch)
    assert torch.equal(before.topk_ids[0], after.topk_ids[0]) and torch.equal(before.gold_nll, after.gold_nll)
    assert torch.allclose(before.topk_logprobs[0], after.topk_logprobs[0]) and torch.equal(before.covered, after.covered)


def test_validate_coverage_equals_the_coverage_training_sees(pico, sp_teacher, tmp_path, monkeypatch, capsys) -> None:
    """`validate` measures alignment on the first rows of each source without loading a model; on
    the same rows it equals the coverage the aligned source reports to the loss."""
    from conftest import run_cli
    from merge_distill.align import TokenBytes
    from merge_distill.recipe_checks import alignment_coverage

    recipe = pico_recipe_dict(pico, tmp_path / "run")
    recipe["teachers"][1]["model"] = str(sp_teacher)
    path = write_recipe(tmp_path / "r.yaml", recipe)
    loaded = load_recipe(path)
    tokenizer = load_tokenizer(str(pico["student"]))
    rows = training_rows(loaded, tokenizer)
    counts = alignment_coverage(TokenBytes(tokenizer), TokenBytes(load_tokenizer(str(sp_teacher))), rows[:1], max_rows=3)
    source = rows[0]
    ids, labels, mask = source.take(slice(0, 3))
    batch = TokenBatch(ids, mask, labels, [source.domain] * 3, [source.label] * 3)
    signals = AlignedTeachers.open(loaded, accelerator_for(loaded), tokenizer).signals(batch)
    mask = batch.targets != IGNORE_INDEX
    assert counts == {source.domain: (int((signals.covered[..., 1] & mask).sum()), int(mask.sum()))}
    assert 0 < counts[source.domain][0] < counts[source.domain][1]
    code, out = run_cli(["validate", str(path)], monkeypatch, capsys)
    assert code == 0 and "teacher 'prose' uses another tokenizer" in out and "of the student's target positions" in out


def test_length_groups_minimise_padded_tokens_exactly() -> None:
    """The dynamic programme against every way of cutting the sorted rows into runs."""
    import itertools
    import random

    from merge_distill.sources.aligned import length_groups

    def cost(groups, lengths, overhead):
        return sum(len(g) * max(lengths[i] for i in g) + overhead for g in groups)

    rng = random.Random(0)
    for _ in range(200):
        lengths = [rng.randint(1, 600) for _ in range(rng.randint(1, 7))]
        overhead = rng.choice([0, 64, 500])
        groups = length_groups(lengths, overhead)
        assert sorted(i for g in groups for i in g) == list(range(len(lengths)))  # every row once
        order = sorted(range(len(lengths)), key=lengths.__getitem__)
        best = min(cost([order[a:b] for a, b in zip((0, *cuts), (*cuts, len(order)))], lengths, overhead)
                   for n in range(len(order)) for cuts in itertools.combinations(range(1, len(order)), n))
        assert cost(groups, lengths, overhead) == best


def sentencepiece_source(pico, sp_teacher, tmp_path) -> tuple[AlignedTeachers, TokenBatch]:
    """The pico recipe with its second teacher on a SentencePiece tokenizer: the aligned source and
    3 packed rows."""
    recipe = pico_recipe_dict(pico, tmp_path / "run")
    recipe["teachers"][1]["model"] = str(sp_teacher)
    loaded = load_recipe(write_recipe(tmp_path / "r.yaml", recipe))
    tokenizer = load_tokenizer(str(pico["student"]))
    return AlignedTeachers.open(loaded, accelerator_for(loaded), tokenizer), packed_batch(loaded, tokenizer, rows=3)


def test_grouped_forwards_give_the_one_forward_signals(pico, sp_teacher, tmp_path, monkeypatch) -> None:
    """Rows of the SentencePiece teacher run in length groups; the signals equal those of one
    padded forward over the batch (what a ZeRO-3 teacher does) up to float32 summation order."""
    source, batch = sentencepiece_source(pico, sp_teacher, tmp_path)
    import merge_distill.sources.aligned as aligned

    monkeypatch.setattr(aligned, "FORWARD_TOKENS", 0)  # a forward costs nothing: one group per length
    ids, attention, *_ = source._teacher_batch(batch, 1)
    assert len(aligned.length_groups(attention.sum(-1).tolist(), 0)) > 1  # rows of different lengths: several forwards
    grouped = source.teacher_targets(batch, 16)
    source.sharded = True
    single = source.teacher_targets(batch, 16)
    for a, b in zip(grouped, single):
        assert torch.equal(a.span, b.span)
        assert torch.allclose(a.logprobs, b.logprobs, atol=1e-5) and torch.allclose(a.gold_nll, b.gold_nll, atol=1e-5)


def test_whole_teachers_run_their_head_on_the_aligned_positions_only(pico, sp_teacher, tmp_path, monkeypatch) -> None:
    """A whole teacher with a plain linear head hands over its hidden states: the forward builds
    logits for each row's last position only, and the targets (made chunk by chunk from the hidden
    states at the aligned positions) equal those made from its full logits, up to float32
    summation order."""
    source, batch = sentencepiece_source(pico, sp_teacher, tmp_path)
    teacher = source.models[1]
    widths = []
    hook = teacher.get_output_embeddings().register_forward_hook(lambda m, i, out: widths.append(out.shape[1]))
    from_hidden = source.teacher_targets(batch, 16)
    hook.remove()
    assert widths and set(widths) == {1}
    monkeypatch.setattr(teacher, "get_output_embeddings", lambda: None)  # as a head the source cannot run itself
    from_logits = source.teacher_targets(batch, 16)
    for a, b in zip(from_hidden, from_logits):
        assert torch.equal(a.span, b.span) and torch.equal(a.ids, b.ids)
        assert torch.allclose(a.logprobs, b.logprobs, atol=1e-5) and torch.allclose(a.tail, b.tail, atol=1e-5)
        assert torch.allclose(a.gold_nll, b.gold_nll, atol=1e-5) and torch.allclose(a.entropy, b.entropy, atol=1e-5)
    assert (from_hidden[1].span >= 0).any()


def test_a_teacher_that_rescales_its_logits_is_aligned_on_its_own_logits(pico, sp_teacher, tmp_path, monkeypatch) -> None:
    """A cross-tokenizer teacher whose logits are scaled after its head (as Cohere's logit_scale):
    its targets are those of its own (scaled) logits, not of its head alone."""
    source, batch = sentencepiece_source(pico, sp_teacher, tmp_path)
    unscaled = source.teacher_targets(batch, 16)[1]
    teacher = source.models[1]
    teacher.register_forward_hook(lambda module, args, output: setattr(output, "logits", output.logits * 0.25) or output)
    source.head_verified.clear()
    scaled = source.teacher_targets(batch, 16)[1]
    assert source.head_verified[1] is False
    monkeypatch.setattr(teacher, "get_output_embeddings", lambda: None)  # the logits path, with the scale
    reference = source.teacher_targets(batch, 16)[1]
    assert torch.allclose(scaled.logprobs, reference.logprobs, atol=1e-5)
    assert torch.allclose(scaled.entropy, reference.entropy, atol=1e-5)
    assert not torch.allclose(scaled.entropy, unscaled.entropy, atol=1e-3)  # the scale changes the distribution
