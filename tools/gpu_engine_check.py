"""The real engine on a GPU: `merge-distill run` with two ZeRO-3 teachers in bf16.

    python3 tools/gpu_engine_check.py [--steps 6]

Builds pico assets (a local tokenizer and random-init Llama teachers a few times larger than
the test ones), writes a recipe with precision bf16 and distributed.use_deepspeed: always, runs
it through the CLI entry point, and prints the metrics, the report and a reload check.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from merge_distill.cli import main as cli_main  # noqa: E402
from merge_distill.pico import build_bpe_tokenizer, pico_llama, prose_texts, stdlib_texts  # noqa: E402


def build(out: Path) -> dict[str, str]:
    code, prose = stdlib_texts(200, 20000), prose_texts(200)
    tok = build_bpe_tokenizer(code + prose, 2048, out / "tokenizer")
    paths = {}
    for name, seed, hidden, layers in (("code", 1, 256, 4), ("prose", 2, 256, 4), ("student", 3, 128, 2)):
        model = pico_llama(len(tok) + 64, seed, hidden=hidden, layers=layers, max_len=512)
        model.save_pretrained(out / name)
        tok.save_pretrained(out / name)
        paths[name] = str(out / name)
    for name, texts in (("code", code), ("prose", prose)):
        with open(out / f"{name}.jsonl", "w") as fh:
            fh.writelines(json.dumps({"text": t}) + "\n" for t in texts)
    return paths


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=6)
    args = parser.parse_args()
    print("device:", torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        paths = build(out)
        recipe = {
            "name": "gpu_engine_check",
            "teachers": [{"name": "code", "model": paths["code"]}, {"name": "prose", "model": paths["prose"]}],
            "student": {"model": paths["student"]},
            "data": {"seq_len": 256, "train": [
                {"type": "jsonl", "path": str(out / "code.jsonl"), "domain": "code"},
                {"type": "jsonl", "path": str(out / "prose.jsonl"), "domain": "prose"}],
                "eval": [{"type": "jsonl", "path": str(out / "code.jsonl"), "domain": "code", "max_examples": 4}]},
            "routing": {"kind": "ce", "tau": 0.5},
            "loss": {"kind": "forward_kl", "hard_label_weight": 0.1},
            "train": {"steps": args.steps, "micro_batch_size": 8, "lr": 1e-3, "precision": "bf16", "log_every": 1},
            "distributed": {"use_deepspeed": "always", "teacher_zero_stage": 3, "student_zero_stage": 2},
            "output": {"dir": str(out / "run")},
        }
        (out / "r.yaml").write_text(yaml.safe_dump(recipe))
        sys.argv = ["merge-distill", "run", str(out / "r.yaml"), "--no-color"]
        try:
            cli_main()
        except SystemExit as exc:
            if exc.code:
                raise
        from transformers import AutoModelForCausalLM

        student = AutoModelForCausalLM.from_pretrained(out / "run" / "student")
        print("reloaded student:", student.config.num_hidden_layers, "layers,",
              sum(p.numel() for p in student.parameters()), "parameters, dtype", next(student.parameters()).dtype)
        print("run.json:", (out / "run" / "run.json").read_text())
        print("peak GPU memory (MiB):", torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else 0)


if __name__ == "__main__":
    main()
