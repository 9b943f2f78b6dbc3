"""The offline cache of teachers with other tokenizers: each teacher's top-k stored in its own
vocabulary at the student's positions with its span, projected when read; the manifest
fingerprints every teacher's tokenizer."""

from __future__ import annotations

import json

import pytest

from conftest import pico_recipe_dict, run_cli, write_recipe
from merge_distill.cache import codec
from merge_distill.cache.manifest import read_manifest
from merge_distill.cache.writer import write_cache
from merge_distill.engine import setup_run, train_step
from merge_distill.errors import UserError
from merge_distill.models import load_tokenizer
from merge_distill.pico import build_bpe_tokenizer, pico_llama, prose_texts, stdlib_texts
from merge_distill.recipe import load_recipe
from merge_distill.sources import AlignedTeachers, CachedTeachers

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def mixed_recipe(pico, sp_teacher, tmp_path):
    """A byte-level student, one teacher with its tokenizer (code) and one with a SentencePiece
    tokenizer of its own (prose), 3 + 3 packed rows, a float32 cache at k = align.k = 16."""
    recipe = pico_recipe_dict(pico, tmp_path / "run", routing={"kind": "ce", "tau": 1.0},
                              loss={"kind": "jsd", "beta": 0.5, "temperature": 1.5})
    recipe["teachers"][1]["model"] = str(sp_teacher)
    for source in recipe["data"]["train"]:
        source["max_examples"] = 3
    recipe["align"] = {"k": 16}
    recipe["cache"] = {"dir": str(tmp_path / "cache"), "k": 16, "dtype": "float32", "rows_per_shard": 4}
    return write_recipe(tmp_path / "mixed.yaml", recipe)


def test_the_cache_of_a_mixed_recipe_gives_the_online_steps(mixed_recipe, sp_teacher) -> None:
    """Same student and rows: the step losses read from the cache equal those of the teachers run
    online through the alignment (float32 storage, the same k): the cache stores exactly what the
    aligned source computes, before the projection that both then apply."""
    result = write_cache(load_recipe(mixed_recipe), show_progress=False)
    manifest = read_manifest(result.root)
    assert manifest["complete"] and manifest["aligned"] == ["prose"]
    assert manifest["id_bits"] == [codec.id_bits(manifest["vocab_size"]), codec.id_bits(len(load_tokenizer(str(sp_teacher))))]
    assert manifest["teachers"][0]["tokenizer"] != manifest["teachers"][1]["tokenizer"]
    losses = {}
    for use in ("false", "true"):
        parts = setup_run(load_recipe(mixed_recipe, [f"cache.use={use}"]), overwrite=True)
        source = parts.training.source
        assert isinstance(source, CachedTeachers if use == "true" else AlignedTeachers)
        losses[use] = [train_step(parts.training, parts.plan, step) for step in range(3)]
    for online, cached in zip(losses["false"], losses["true"]):
        assert cached.loss == pytest.approx(online.loss, rel=1e-5)
        for name, share in online.share.items():  # routed on the same per-byte NLL
            assert cached.share[name] == pytest.approx(share, rel=1e-5)
        ours, theirs = cached.stats.summary()["overall"], online.stats.summary()["overall"]
        for name in ("code", "prose"):  # the same positions aligned, the same bytes per token
            assert ours[name]["aligned"] == pytest.approx(theirs[name]["aligned"], rel=1e-9)
            assert ours[name]["bytes_per_token"] == pytest.approx(theirs[name]["bytes_per_token"], rel=1e-6)


def test_stored_top_k_is_in_the_teacher_vocabulary_with_spans(mixed_recipe, sp_teacher) -> None:
    from transformers import AutoTokenizer

    recipe = load_recipe(mixed_recipe)
    write_cache(recipe, show_progress=False)
    cached = setup_run(load_recipe(mixed_recipe, ["cache.use=true"]), overwrite=True).training.source
    manifest = cached.cache.manifest
    label = manifest["sources"][1]["label"]
    data = cached.cache.read([label, label], [0, 1])
    sp_size = len(AutoTokenizer.from_pretrained(sp_teacher))
    span, ids = data["span"][1], data["ids"][1]
    aligned = span >= 0
    assert bool(aligned.any()) and bool((~aligned).any())  # some positions aligned, some not
    assert int(ids[aligned].max()) < sp_size and int(ids[aligned].max()) > 300  # ids of the teacher's own vocabulary
    assert bool((data["span"][0] >= 0).sum() > aligned.sum())  # the same-tokenizer teacher covers more


def test_a_cache_written_for_another_tokenizer_is_refused_at_validate(mixed_recipe, sp_teacher, monkeypatch, capsys) -> None:
    write_cache(load_recipe(mixed_recipe), show_progress=False)
    load_recipe(mixed_recipe, ["cache.use=true"])  # the same teachers: accepted
    tokenizer_json = sp_teacher / "tokenizer.json"
    original = tokenizer_json.read_text()
    try:
        spec = json.loads(original)
        spec["model"]["merges"].pop()  # one merge fewer: the teacher tokenizes differently
        tokenizer_json.write_text(json.dumps(spec))
        with pytest.raises(UserError, match=r"teachers\[1\] \(prose\): its tokenizer in .* differs from the one the "
                                            r"cache in .* was written with"):
            load_recipe(mixed_recipe, ["cache.use=true"])
        code, out = run_cli(["validate", str(mixed_recipe), "cache.use=true"], monkeypatch, capsys)
        assert code == 2 and "its tokenizer in" in out and "merge-distill cache" in out and "Traceback" not in out
    finally:
        tokenizer_json.write_text(original)


def test_cache_k_above_a_teacher_vocabulary_is_refused(mixed_recipe, tmp_path, monkeypatch, capsys) -> None:
    """The student has 384 tokens; a teacher with 300 of its own cannot store a top-350."""
    small = tmp_path / "small_teacher"
    tokenizer = build_bpe_tokenizer(stdlib_texts(20) + prose_texts(20), 300, small)
    pico_llama(len(tokenizer), seed=3, layers=1).save_pretrained(small)
    code, out = run_cli(["cache", str(mixed_recipe), "cache.k=350", f"teachers.1.model={small}", "--no-color"],
                        monkeypatch, capsys)
    assert code == 2 and f"teacher 'prose' has {len(tokenizer)} tokens" in out and "use at most" in out
