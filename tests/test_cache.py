"""The offline teacher cache: round trip against the teachers, resume after a kill, manifest
checks naming the field, and training from the cache end to end."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import datasets
import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import run_cli
import merge_distill.cache.writer as cache_writer
from merge_distill.cache import codec
from merge_distill.cache.manifest import read_manifest
from merge_distill.cache.reader import TeacherCache
from merge_distill.cache.writer import write_cache
from merge_distill.sources import CachedTeachers, SparseSignals, needs_problems
from merge_distill.sources.signals import DenseSignals
from e2e import run_and_check
from merge_distill.engine import train_step
from merge_distill.errors import UserError
from merge_distill.recipe import load_recipe
from merge_distill.routing import LearnedRouter
from merge_distill.engine import setup_run
from merge_distill.signals import per_token_stats


pytestmark = pytest.mark.usefixtures("one_thread")


def quiet() -> dict:
    return {"show_progress": False}


@pytest.mark.parametrize("dtype,tolerance", [("float32", 1e-6), ("float16", 2e-2), ("bfloat16", 1.3e-1),
                                             ("uint8", codec.QUANT_STEP / 2 + 1e-6)])
def test_round_trip_equals_the_dense_teacher(cached_recipe, dtype: str, tolerance: float) -> None:
    path = cached_recipe(dtype=dtype)
    recipe = load_recipe(path, ["loss.temperature=2.0"])
    result = write_cache(recipe, **quiet())
    manifest = read_manifest(result.root)
    bits = codec.id_bits(manifest["vocab_size"])
    assert manifest["complete"] and manifest["id_bits"] == [bits, bits]
    # what the format promises per row: k ids at `bits` bits and k values per position, nothing more
    shard = datasets.load_from_disk(str(result.root / next(iter(manifest["checksums"])))).data.table
    T = manifest["seq_len"]
    assert {len(b) for b in shard.column("t0_ids").to_pylist()} == {math.ceil(T * 8 * bits / 8)}
    assert {len(b) for b in shard.column("t1_values").to_pylist()} == {T * 8 * codec.VALUE_BYTES[dtype]}
    assert manifest["bytes_per_token_per_teacher"] >= codec.bytes_per_token(8, dtype, manifest["vocab_size"], False, False)
    parts = setup_run(load_recipe(path, ["loss.temperature=2.0", "train.steps=1"]), overwrite=True)
    store = TeacherCache(result.root, manifest)
    source = parts.plan.stream.sources[1]
    rows = [0, 2, 1]
    got = store.read([source.label] * 3, rows)
    taken = source.take(rows)
    batch_ids = taken.input_ids
    targets = torch.cat([taken.labels[:, 1:], torch.full((3, 1), -100)], dim=1)
    for j, model in enumerate(parts.training.source.models):
        with torch.no_grad():
            logits = model(input_ids=batch_ids, attention_mask=taken.attention_mask).logits[..., : parts.training.vocab_size]
        nll, entropy, top1 = per_token_stats(logits, targets)
        torch.testing.assert_close(got["nll"][j], nll, rtol=0, atol=0)  # exact: the function routers get online
        torch.testing.assert_close(got["entropy"][j], entropy, rtol=0, atol=0)
        logprobs = torch.log_softmax(logits / 2.0, -1)
        values, ids = logprobs.topk(8, -1)
        assert torch.equal(got["ids"][j].long(), ids) and torch.equal(got["ids"][j][..., 0].long(), top1)
        torch.testing.assert_close(got["values"][j].float(), values, rtol=0, atol=tolerance)
        tail = torch.logsumexp(logprobs.scatter(-1, ids, -math.inf), -1)
        torch.testing.assert_close(got["tail"][j], tail, rtol=1e-5, atol=1e-5)


def test_resume_after_a_kill_keeps_complete_shards_and_redoes_the_partial_one(cached_recipe, monkeypatch) -> None:
    recipe = load_recipe(cached_recipe(rows_per_shard=4))
    real_save = cache_writer._save_shard
    saved: list[str] = []

    def dying_save(columns, final):
        if len(saved) == 2:  # the third shard is half-written when the process "dies"
            partial = final.with_name(final.name + ".partial")
            partial.mkdir()
            (partial / "data-00000-of-00001.arrow").write_bytes(b"half")
            raise KeyboardInterrupt
        real_save(columns, final)
        saved.append(final.name)

    monkeypatch.setattr(cache_writer, "_save_shard", dying_save)
    with pytest.raises(KeyboardInterrupt):
        write_cache(recipe, **quiet())
    root = Path(recipe.cache.dir)
    manifest = read_manifest(root)
    assert manifest is not None and not manifest["complete"]
    complete = sorted(p for p in root.glob("sources/*/shard-*") if not p.name.endswith(".partial"))
    partials = list(root.glob("sources/*/*.partial"))
    assert len(complete) == 2 and len(partials) == 1
    stamps = {p: (p / "data-00000-of-00001.arrow").stat().st_mtime_ns for p in complete}
    with pytest.raises(UserError, match="incomplete"):
        load_recipe(cached_recipe(rows_per_shard=4), ["cache.use=true"])

    monkeypatch.setattr(cache_writer, "_save_shard", real_save)
    result = write_cache(recipe, **quiet())
    assert result.shards_kept == 2 and result.shards_written == sum(s["shards"] for s in manifest["sources"]) - 2
    assert not list(root.glob("sources/*/*.partial"))
    assert all((p / "data-00000-of-00001.arrow").stat().st_mtime_ns == t for p, t in stamps.items())
    # The resumed cache holds exactly what an uninterrupted write gives.
    fresh_root = result.root.with_name("fresh")
    write_cache(load_recipe(cached_recipe("fresh.yaml", rows_per_shard=4, dir=str(fresh_root))), **quiet())
    a, b = TeacherCache(result.root, read_manifest(result.root)), TeacherCache(fresh_root, read_manifest(fresh_root))
    labels = [s["label"] for s in manifest["sources"] for _ in range(s["rows"])]
    rows = [r for s in manifest["sources"] for r in range(s["rows"])]
    got, want = a.read(labels, rows), b.read(labels, rows)
    for field in want:
        assert all(torch.equal(x, y) for x, y in zip(got[field], want[field])), field


@pytest.mark.parametrize("override,field", [
    ("cache.k=4", "cache.k is 4 but the cache in"),
    ("data.seq_len=24", "data.seq_len is 24 but the cache in"),
    ("loss.temperature=2.0", "loss.temperature is 2.0 but the cache in"),
    ("cache.dtype=float32", "cache.dtype is 'float32' but the cache in"),
])
def test_mismatched_manifest_is_refused_naming_the_field(cached_recipe, override: str, field: str, monkeypatch, capsys) -> None:
    path = cached_recipe()
    write_cache(load_recipe(path), **quiet())
    with pytest.raises(UserError) as exc:
        load_recipe(path, ["cache.use=true", override])
    assert len(exc.value.problems) == 1 and exc.value.problems[0].startswith(field), exc.value.problems
    code, out = run_cli(["run", str(path), "cache.use=true", override], monkeypatch, capsys)
    assert code == 2 and field.split(" is ")[0] in out and "Traceback" not in out


def test_changed_teacher_data_or_weights_are_refused(cached_recipe, pico, tmp_path, monkeypatch, capsys) -> None:
    path = cached_recipe()
    write_cache(load_recipe(path), **quiet())
    other = tmp_path / "teacher_copy"
    shutil.copytree(pico["teacher_b"], other)
    with pytest.raises(UserError, match=r"^teachers\[1\]\.model is '.*teacher_copy' but the cache in .* was written with"):
        load_recipe(path, ["cache.use=true", f"teachers.1.model={other}"])
    # Same path, retrained weights: the fingerprint differs.
    model = AutoModelForCausalLM.from_pretrained(other)
    with torch.no_grad():
        model.lm_head.weight.mul_(1.5)
    model.save_pretrained(other)
    other_path = cached_recipe("other.yaml", dir=str(tmp_path / "cache2"))
    recipe = load_recipe(other_path, [f"teachers.1.model={other}"])
    write_cache(recipe, **quiet())
    model.save_pretrained(other)  # unchanged weights saved again: still the same teacher
    load_recipe(other_path, [f"teachers.1.model={other}", "cache.use=true"])
    with torch.no_grad():
        model.lm_head.weight.mul_(2.0)
    model.save_pretrained(other)
    with pytest.raises(UserError, match=r"teachers\[1\] \(prose\): the config, tokenizer or weights in .* changed"):
        load_recipe(other_path, [f"teachers.1.model={other}", "cache.use=true"])
    # Same weights, another tokenizer: the cache is in the teacher's own vocabulary, so it differs too.
    with torch.no_grad():
        model.lm_head.weight.div_(2.0)
    model.save_pretrained(other)
    load_recipe(other_path, [f"teachers.1.model={other}", "cache.use=true"])  # the cached teacher again
    (other / "tokenizer.json").write_text((other / "tokenizer.json").read_text().replace('"<pad>"', '"<pad0>"', 1))
    with pytest.raises(UserError, match=r"teachers\[1\] \(prose\): its tokenizer in .* differs from the one"):
        load_recipe(other_path, [f"teachers.1.model={other}", "cache.use=true"])
    # Different data: checked on the tokenized rows when the run starts, before any step.
    with pytest.raises(UserError, match=r"data\.train\[0\] \(code\): its tokenized rows differ"):
        setup_run(load_recipe(path, ["cache.use=true", "data.train.0.max_examples=2"]))


def test_writer_refuses_a_different_cache_without_overwrite(cached_recipe, monkeypatch, capsys) -> None:
    path = cached_recipe()
    code, out = run_cli(["cache", str(path), "--no-color"], monkeypatch, capsys)
    assert code == 0 and "cache complete" in out
    code, out = run_cli(["cache", str(path), "cache.k=4", "--no-color"], monkeypatch, capsys)
    assert code == 2 and "cache.k is 4" in out and "--overwrite" in out
    code, out = run_cli(["cache", str(path), "cache.k=4", "--overwrite", "--no-color"], monkeypatch, capsys)
    assert code == 0 and read_manifest(Path(load_recipe(path).cache.dir))["k"] == 4
    code, out = run_cli(["cache", str(cached_recipe("nocache.yaml", k=10**6))], monkeypatch, capsys)
    assert code == 2 and "cache.k is 1000000 but the vocabulary has" in out


def test_training_from_the_cache_end_to_end_writes_a_loadable_student(cached_recipe) -> None:
    path = cached_recipe()
    write_cache(load_recipe(path), **quiet())
    recipe = load_recipe(path, ["cache.use=true", "routing.kind=ce"])
    run_dir, rows = run_and_check(recipe)
    assert [r["step"] for r in rows] == [1, 2, 3]
    stats = json.loads((run_dir / "stats.json").read_text())
    assert stats["tokens"] > 0 and stats["agreement"] and 0 <= stats["agreement"][0]["js"] <= math.log(2)
    model = AutoModelForCausalLM.from_pretrained(run_dir / "student")
    assert model.config.num_hidden_layers == 1


@pytest.mark.parametrize("dtype,rel", [("float32", 1e-5), ("float16", 1e-3)])
def test_cache_at_k_equal_vocab_gives_the_online_loss(cached_recipe, dtype: str, rel: float) -> None:
    """Same student, same rows: step losses from the cache (k = V) equal the online ones up to the
    storage rounding. Routing uses the cached NLL (ce router). (Below k = V the bucket loss is
    smaller than the full one: the pico teachers are random, nearly uniform, so their top-k
    hold little mass; tests/losses/test_sparse.py checks peaked teachers at k = V/4.)"""
    path = cached_recipe(k=384, dtype=dtype)
    write_cache(load_recipe(path, ["loss.temperature=1.5"]), **quiet())
    losses = {}
    for use in ("false", "true"):
        parts = setup_run(load_recipe(path, [f"cache.use={use}", "routing.kind=ce", "loss.temperature=1.5"]), overwrite=True)
        assert isinstance(parts.training.source, CachedTeachers) == (use == "true")  # no teacher loaded from the cache
        losses[use] = [train_step(parts.training, parts.plan, step).loss for step in range(3)]
    for online, cached in zip(losses["false"], losses["true"]):
        assert cached == pytest.approx(online, rel=rel)


def test_routers_needing_full_distributions_are_refused_by_the_cache_source(cached_recipe) -> None:
    cached = load_recipe(cached_recipe(k=8), ["cache.use=false"]).model_copy(deep=True)
    cached.cache.use = True
    online = load_recipe(cached_recipe(k=8), ["cache.use=false"])
    assert needs_problems(cached, "learned", LearnedRouter.needs) == []  # hidden comes from the student
    (problem,) = needs_problems(cached, "fancy", frozenset({"logits", "gold_nll"}))
    assert problem.startswith("routing.kind: 'fancy' needs logits, which the cache teacher source does not provide")
    assert "cache.use: false" in problem
    assert needs_problems(online, "fancy", frozenset({"logits", "gold_nll"})) == []  # online teachers give logits


def test_agreement_from_the_cache_equals_the_dense_one_at_k_equal_vocab() -> None:
    from merge_distill.report.stats import BlendStats

    g = torch.Generator().manual_seed(0)
    B, T, V, K = 2, 9, 13, 3
    logits = [3 * torch.randn(B, T, V, generator=g) for _ in range(K)]
    mask = torch.rand(B, T, generator=g) > 0.3
    values, ids = zip(*(torch.log_softmax(x, -1).topk(V, -1) for x in logits))
    signals = SparseSignals(["a", "b", "c"], [i.int() for i in ids], list(values),
                                   [torch.full((B, T), -math.inf) for _ in range(K)],
                                   torch.zeros(B, T, K), torch.zeros(B, T, K))
    assert torch.equal(signals.top1, torch.stack([x.argmax(-1) for x in logits], -1))
    dense, sparse = BlendStats(["a", "b", "c"]), BlendStats(["a", "b", "c"])
    online = DenseSignals(["a", "b", "c"], logits, torch.zeros(B, T, K), torch.zeros(B, T, K)).agreement(mask, V, 8)
    cached = signals.agreement(mask, V, max_tokens=8)
    dense.add_agreement(online.top1, online.js, online.tokens)
    sparse.add_agreement(cached.top1, cached.js, cached.tokens)
    for d, s in zip(dense.summary()["agreement"], sparse.summary()["agreement"]):
        assert s["top1_agreement"] == d["top1_agreement"]
        assert s["js"] == pytest.approx(d["js"], rel=1e-5)
