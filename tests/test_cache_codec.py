"""The cache's compact storage: packed ids, quantised values, adaptive k with an exact tail,
and corrupt shards caught by the manifest's checksums (`cache --verify`, and at read)."""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import run_cli
from merge_distill.cache import codec
from merge_distill.cache.manifest import read_manifest
from merge_distill.cache.reader import TeacherCache
from merge_distill.cache.writer import write_cache
from merge_distill.engine import setup_run
from merge_distill.recipe import load_recipe

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("vocab", [2, 4096, 49_152, 151_936, 262_144])
def test_ids_round_trip_at_the_bits_the_vocabulary_needs(vocab: int) -> None:
    ids = np.random.default_rng(vocab).integers(0, vocab, size=1001)
    ids[:2] = [0, vocab - 1]
    bits = codec.id_bits(vocab)
    assert 2 ** (bits - 1) < vocab <= 2 ** bits
    packed = codec.pack_ids(ids, bits)
    assert len(packed) == math.ceil(1001 * bits / 8)
    assert np.array_equal(codec.unpack_ids(packed, 1001, bits), ids)


def test_uint8_values_within_half_a_step_and_clipped_far_down() -> None:
    values = torch.cat([-torch.rand(500) * 15.0, torch.tensor([0.0, -15.9, -40.0])])
    back = codec.decode_values(codec.encode_values(values, "uint8"), "uint8")
    inside = values > -255 * codec.QUANT_STEP
    assert float((back[inside] - values[inside]).abs().max()) <= codec.QUANT_STEP / 2 + 1e-6
    assert float(back[-1]) == pytest.approx(-255 * codec.QUANT_STEP)


def test_kept_counts_and_tail_against_a_plain_loop() -> None:
    torch.manual_seed(0)
    logits = torch.randn(40, 300) * 3
    logprobs = logits.log_softmax(-1)
    values, ids = logprobs.topk(32, -1)
    tail = torch.logsumexp(logprobs.scatter(-1, ids, -math.inf), -1)
    n = codec.kept_counts(values, 0.6)
    kept_tail = codec.kept_tail(values, tail, n)
    for row in range(40):
        probs = values[row].exp().tolist()
        want = next((i + 1 for i in range(32) if sum(probs[: i + 1]) >= 0.6), 32)
        assert int(n[row]) == want
        rest = logprobs[row].clone()
        rest[ids[row, :want]] = -math.inf
        assert float(kept_tail[row]) == pytest.approx(float(torch.logsumexp(rest, -1)), abs=1e-5)
    assert torch.equal(codec.kept_counts(values, 1.0), torch.full((40,), 32))


def test_row_round_trip_pads_with_entries_that_list_nothing() -> None:
    ids = torch.randint(0, 4096, (6, 8))
    values = torch.randn(6, 8).sort(-1, descending=True).values - 3
    n = torch.tensor([1, 8, 3, 5, 2, 8])
    got_ids, got_values = codec.decode_row(*codec.encode_row(ids, values, n, "float32", 12), n.numpy(), 8, "float32", 12)
    for t in range(6):
        assert torch.equal(got_ids[t, : n[t]], ids[t, : n[t]]) and torch.equal(got_values[t, : n[t]], values[t, : n[t]])
        assert bool((got_values[t, n[t]:] == -math.inf).all()) and bool((got_ids[t, n[t]:] == ids[t, 0]).all())


def test_adaptive_k_keeps_the_fewest_entries_reaching_the_mass_and_an_exact_tail(cached_recipe) -> None:
    path = cached_recipe(mass=0.5, dtype="float32")
    sharp = "loss.temperature=0.05"  # pico teachers are near uniform; at a low temperature top entries hold the mass
    result = write_cache(load_recipe(path, [sharp]), show_progress=False)
    manifest = read_manifest(result.root)
    parts = setup_run(load_recipe(path, ["train.steps=1", sharp]), overwrite=True)
    source = parts.plan.stream.sources[0]
    got = TeacherCache(result.root, manifest).read([source.label] * 2, [0, 1])
    taken = source.take([0, 1])
    for j, model in enumerate(parts.training.source.models):
        with torch.no_grad():
            logprobs = model(input_ids=taken.input_ids, attention_mask=taken.attention_mask).logits[
                ..., : parts.training.vocab_size].div(0.05).log_softmax(-1)
        values, ids = logprobs.topk(8, -1)
        n = codec.kept_counts(values.reshape(-1, 8), 0.5).view(2, -1)
        kept = torch.arange(8) < n[..., None]
        assert int(n.min()) < 8 and int(n.max()) == 8, n  # some positions keep fewer than k
        assert torch.equal(got["ids"][j][kept], ids[kept])
        torch.testing.assert_close(got["values"][j][kept], values[kept], rtol=1e-5, atol=1e-5)
        assert bool((got["values"][j][~kept] == -math.inf).all())
        rest = logprobs.scatter(-1, torch.where(kept, ids, ids[..., :1]), -math.inf)
        torch.testing.assert_close(got["tail"][j], torch.logsumexp(rest, -1), rtol=1e-5, atol=1e-5)


def test_a_corrupt_shard_is_named_by_verify_and_by_a_run_then_rewritten(cached_recipe, monkeypatch, capsys) -> None:
    path = cached_recipe(rows_per_shard=4)
    code, out = run_cli(["cache", str(path), "--no-color"], monkeypatch, capsys)
    assert code == 0, out
    code, out = run_cli(["cache", str(path), "--verify", "--no-color"], monkeypatch, capsys)
    root = Path(load_recipe(path).cache.dir)
    names = list(read_manifest(root)["checksums"])
    assert code == 0 and "cache ok" in out and f"({len(names)} shards" in " ".join(out.split()), out
    for i, name in enumerate(names):  # a run may read any shard: every one is damaged
        arrow = next((root / name).glob("*.arrow"))
        data = bytearray(arrow.read_bytes())
        if i % 2:
            data[len(data) // 2] ^= 0xFF  # one flipped byte
        else:
            del data[100:]  # truncated
        arrow.write_bytes(bytes(data))
    code, out = run_cli(["cache", str(path), "--verify", "--no-color"], monkeypatch, capsys)
    out = " ".join(out.split())
    assert code == 2 and "Traceback" not in out, out
    assert f"shard {names[1]} of" in out and f"shard {names[2]} of" in out and out.count("is corrupt") == len(names)
    assert "delete that folder and run `merge-distill cache RECIPE`" in out
    code, out = run_cli(["run", str(path), "cache.use=true", "--overwrite"], monkeypatch, capsys)
    assert code == 2 and "is corrupt" in out and "Traceback" not in out, out
    for name in names[1:]:
        shutil.rmtree(root / name)
    code, out = run_cli(["cache", str(path), "--verify", "--no-color"], monkeypatch, capsys)
    assert code == 2 and f"shard {names[1]} of {root} is missing" in " ".join(out.split()), out
    shutil.rmtree(root / names[0])
    code, out = run_cli(["cache", str(path), "--no-color"], monkeypatch, capsys)
    assert code == 0 and f"{len(names)} shards written, 0 kept" in " ".join(out.split()), out
    code, out = run_cli(["cache", str(path), "--verify", "--no-color"], monkeypatch, capsys)
    assert code == 0 and "cache ok" in out, out
