"""`cache.store: hidden`: each teacher's final hidden states (int8) and its head, so that a cached
run gets every teacher's full distribution back (cache/codec.py, sources/cached.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conftest import run_cli
from e2e import run_and_check
from merge_distill.cache import codec
from merge_distill.cache.manifest import HEADS_FILE, read_manifest
from merge_distill.cache.reader import TeacherCache
from merge_distill.cache.writer import write_cache
from merge_distill.engine import setup_run
from merge_distill.losses.fused import HeadLogits
from merge_distill.recipe import load_recipe
from merge_distill.signals import per_token_stats

pytestmark = pytest.mark.usefixtures("one_thread")


def test_int8_hidden_states_round_trip_within_half_a_step() -> None:
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(3, 5, 16, generator=g) * torch.rand(3, 5, 1, generator=g) * 10
    hidden[1, 2] = 0.0  # an all-zero position keeps scale 1 and decodes to zeros
    rows, scale = codec.encode_hidden(hidden)
    assert [len(r) for r in rows] == [5 * 16] * 3 and scale.shape == (3, 5)
    back = torch.stack([codec.decode_hidden(r, s, 16) for r, s in zip(rows, scale)])
    step = torch.from_numpy(scale).unsqueeze(-1)
    assert bool(((back - hidden).abs() <= step / 2 + 1e-6).all())
    assert torch.equal(back[1, 2], torch.zeros(16))
    assert codec.bytes_per_token_hidden(16) == 16 + 4 + 8


def test_auto_stores_small_teachers_hidden_states_and_a_run_gets_their_distributions_back(cached_recipe) -> None:
    """auto on the pico teachers (hidden size 32: 44 bytes per token) stores hidden states; read back,
    the logits made from them and the stored head match the teachers' own log-probs closely, and
    NLL / entropy are the online ones."""
    path = cached_recipe(store="auto")
    recipe = load_recipe(path)
    result = write_cache(recipe, show_progress=False)
    manifest = read_manifest(result.root)
    assert manifest["store"] == "hidden" and manifest["hidden_sizes"] == [32, 32]
    assert manifest["bytes_per_token_per_teacher"] >= codec.bytes_per_token_hidden(32)
    assert manifest["heads_bytes"] > 0 and HEADS_FILE in manifest["checksums"]
    parts = setup_run(load_recipe(path, ["train.steps=1"]), overwrite=True)
    store = TeacherCache(result.root, manifest)
    source = parts.plan.stream.sources[0]
    rows = [2, 0]
    got = store.read([source.label] * 2, rows)
    taken = source.take(rows)
    targets = torch.cat([taken.labels[:, 1:], torch.full((2, 1), -100)], dim=1)
    V = parts.training.vocab_size
    for j, (model, (weight, cap)) in enumerate(zip(parts.training.source.models, store.heads())):
        with torch.no_grad():
            logits = model(input_ids=taken.input_ids, attention_mask=taken.attention_mask).logits[..., :V]
        assert weight.shape == (V, 32) and cap is None
        made = HeadLogits(got["hidden"][j], weight, V)[slice(0, 2 * store.seq_len)].view(2, -1, V)
        gap = (torch.log_softmax(made, -1) - torch.log_softmax(logits, -1)).abs().max()
        assert float(gap) < 0.02  # int8 hidden states: log-probs within 0.02 nats
        nll, entropy, _ = per_token_stats(logits, targets)
        torch.testing.assert_close(got["nll"][j], nll, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(got["entropy"][j], entropy, rtol=1e-5, atol=1e-5)


def test_training_from_hidden_states_follows_the_online_run(cached_recipe, tmp_path) -> None:
    """The same recipe online and from a hidden-state cache (routing by gold NLL, jsd at T = 2):
    losses within 1e-3 relative and routing shares equal to 1e-5 (NLL and entropy are stored
    exactly); a top-k cache (k = 8 of 392) is far off the online loss, for comparison."""
    overrides = ["routing.kind=ce", "loss.kind=jsd", "loss.temperature=2.0"]
    runs = {}
    for store in ("hidden", "topk"):
        path = cached_recipe(f"{store}.yaml", store=store, dir=str(tmp_path / f"cache-{store}"))
        write_cache(load_recipe(path, overrides), show_progress=False)
        _, runs[store] = run_and_check(load_recipe(path, [*overrides, "cache.use=true",
                                                          f"output.dir={tmp_path / f'run-{store}'}"]))
    _, runs["online"] = run_and_check(load_recipe(path, [*overrides, f"output.dir={tmp_path / 'run-online'}"]))
    for online, hidden, topk in zip(runs["online"], runs["hidden"], runs["topk"]):
        assert hidden["loss"] == pytest.approx(online["loss"], rel=1e-3)
        assert hidden["share"] == pytest.approx(online["share"], rel=1e-5)
        assert abs(topk["divergence"] - online["divergence"]) > 10 * abs(hidden["divergence"] - online["divergence"])


def test_hidden_store_refusals_and_a_damaged_heads_file(cached_recipe, pico, sp_teacher, monkeypatch, capsys) -> None:
    # a teacher with another tokenizer: refused at validate for `hidden`, auto falls back to top-k
    path = cached_recipe(store="hidden")
    raw = path.read_text().replace(str(pico["teacher_b"]), str(sp_teacher))
    path.write_text(raw)
    code, text = run_cli(["validate", str(path)], monkeypatch, capsys)
    assert code == 2 and "cache.store: hidden needs every teacher on the student's tokenizer" in text
    path.write_text(raw.replace("store: hidden", "store: auto"))
    write_cache(load_recipe(path, ["align.k=8"]), show_progress=False, overwrite=True)
    assert read_manifest(Path(load_recipe(path).cache.dir))["store"] == "topk"

    # a hidden cache read with an explicit cache.store: topk is refused, naming the key
    path = cached_recipe("h.yaml", store="hidden", dir=str(path.parent / "cache-h"))
    assert run_cli(["cache", str(path)], monkeypatch, capsys)[0] == 0
    code, text = run_cli(["run", str(path), "cache.use=true", "cache.store=topk"], monkeypatch, capsys)
    assert code == 2 and "cache.store is 'topk' but" in text
    # a flipped byte in the heads: the run and --verify name the file; `cache` writes it again
    heads = path.parent / "cache-h" / HEADS_FILE
    data = bytearray(heads.read_bytes())
    data[-3] ^= 0xFF
    heads.write_bytes(bytes(data))
    code, text = run_cli(["run", str(path), "cache.use=true"], monkeypatch, capsys)
    assert code == 2 and f"{HEADS_FILE} of" in text and "is corrupt" in text and "Traceback" not in text
    code, text = run_cli(["cache", str(path), "--verify"], monkeypatch, capsys)
    assert code == 2 and HEADS_FILE in text
    heads.unlink()
    assert run_cli(["cache", str(path)], monkeypatch, capsys)[0] == 0
    assert run_cli(["cache", str(path), "--verify"], monkeypatch, capsys)[0] == 0
    manifest = json.loads((path.parent / "cache-h" / "manifest.json").read_text())
    assert manifest["complete"] and manifest["store"] == "hidden"
