"""Regenerate docs/RESULTS_CROSS.md: routing per token across tokenizers, in bits per byte.

    python tools/build_demo.py --cross                       # the assets (once)
    python tools/results_cross.py --steps 80 --seeds 0 1 2   # this page

Teachers are the cross-tokenizer specialists of recipes/quickstart_cross.yaml (three tokenizers,
none the student's). Every student has the same architecture, tokenizer, data, steps and seed
set; only the teachers and the routing differ. The reference row routes the same-tokenizer
specialists (recipes/quickstart.yaml's teachers) the same way. Cells: held-out bits per byte
(merge_distill.evaluate: each model on its own tokens of the same text), mean ± standard
deviation over seeds; lower is better.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from merge_distill.distributed import accelerator_for  # noqa: E402
from merge_distill.engine import run  # noqa: E402
from merge_distill.evaluate import evaluate_run  # noqa: E402
from merge_distill.recipe import load_recipe  # noqa: E402

ROUTED = "per-token ce routing"
REFERENCE = "same-tokenizer teachers, ce routing (reference)"


def configs(base: dict[str, Any], same_tokenizer_teachers: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """name -> recipe dict."""
    def variant(**changes: Any) -> dict[str, Any]:
        out = json.loads(json.dumps(base))
        out.update(json.loads(json.dumps(changes)))
        return out

    out = {f"single teacher: {t['name']}": variant(teachers=[t], routing={"kind": "uniform"}) for t in base["teachers"]}
    out["uniform blend"] = variant(routing={"kind": "uniform"})
    out[ROUTED] = variant(routing={"kind": "ce", "tau": 0.5})
    out["data only (plain CE)"] = variant(routing={"kind": "uniform"},
                                          loss={"kind": "forward_kl", "hard_label_weight": 1.0})
    out[REFERENCE] = variant(teachers=same_tokenizer_teachers, routing={"kind": "ce", "tau": 0.5})
    return out


def fmt(values: list[float]) -> str:
    return f"{values[0]:.3f}" if len(values) == 1 else f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", type=Path, default=ROOT / "recipes" / "quickstart_cross.yaml")
    parser.add_argument("--reference", type=Path, default=ROOT / "recipes" / "quickstart.yaml")
    parser.add_argument("--steps", type=int, default=None, help="override train.steps")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "RESULTS_CROSS.md")
    parser.add_argument("--runs", type=Path, default=ROOT / "runs" / "results-cross")
    args = parser.parse_args()

    base_recipe = load_recipe(args.recipe)
    base = base_recipe.model_dump(mode="json")
    base["report"] = {"eval_at_end": True, "eval_teachers": False}
    if args.steps:
        base["train"]["steps"] = args.steps
    same = load_recipe(args.reference).model_dump(mode="json")["teachers"]
    started = time.time()
    teacher_eval = evaluate_run(base_recipe, accelerator_for(base_recipe), None, teachers=True)
    domains = teacher_eval["domains"]
    results: dict[str, list[dict[str, float]]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, recipe_dict in configs(base, same).items():
            for seed in args.seeds:
                tag = "".join(c if c.isalnum() else "_" for c in name) + f"-s{seed}"
                recipe_dict["train"]["seed"] = seed
                recipe_dict["output"]["dir"] = str(args.runs / tag)
                path = Path(tmp) / f"{tag}.yaml"
                path.write_text(yaml.safe_dump(recipe_dict, sort_keys=False))
                print(f"== {name}, seed {seed}", flush=True)
                run_dir = run(load_recipe(path), overwrite=True)
                results.setdefault(name, []).append(json.loads((run_dir / "eval.json").read_text())["rows"][0]["bpb"])
    write_markdown(args, base, teacher_eval, domains, results, time.time() - started)


def write_markdown(args, base, teacher_eval, domains, results, seconds) -> None:
    lines = ["| model | " + " | ".join(domains) + " | mean over domains |", "|" + "---|" * (len(domains) + 2)]
    for row in teacher_eval["rows"]:
        bpb = row["bpb"]
        lines.append(f"| (a) teacher `{row['model']}` (own tokenizer) | " + " | ".join(f"{bpb[d]:.3f}" for d in domains)
                     + f" | {statistics.mean(bpb[d] for d in domains):.3f} |")
    means = {name: [statistics.mean(p[d] for d in domains) for p in per_seed] for name, per_seed in results.items()}
    for name, per_seed in results.items():
        lines.append(f"| student: {name} | " + " | ".join(fmt([p[d] for p in per_seed]) for d in domains)
                     + f" | {fmt(means[name])} |")
    routed, uniform = means[ROUTED], means["uniform blend"]
    singles = {n: v for n, v in means.items() if n.startswith("single")}
    reference = means[REFERENCE]
    per_seed_uniform = all(r < u for r, u in zip(routed, uniform))
    per_seed_singles = all(all(r < s for r, s in zip(routed, v)) for v in singles.values())
    gap = statistics.mean(routed) / statistics.mean(reference) - 1
    plain = means["data only (plain CE)"]
    per_seed_plain = all(r < c for r, c in zip(routed, plain))
    verdict = [
        f"- Routed across tokenizers: mean {statistics.mean(routed):.3f} bits per byte; uniform blend "
        f"{statistics.mean(uniform):.3f}: {'beats it on every seed' if per_seed_uniform else 'does not beat it on every seed'}.",
        f"- Every single-teacher student (best {min(statistics.mean(v) for v in singles.values()):.3f}): "
        f"{'beaten on every seed' if per_seed_singles else 'not beaten on every seed'}.",
        f"- Same-tokenizer routed reference {statistics.mean(reference):.3f}: the cross-tokenizer student is "
        f"{100 * gap:+.1f}% from it ({'within' if gap <= 0.10 else 'outside'} the 10% target).",
        f"- The student trained on the data alone (plain CE): {statistics.mean(plain):.3f}: "
        f"{'beaten on every seed' if per_seed_plain else 'not beaten on every seed'} by the routed cross-tokenizer "
        "student.",
    ]
    text = f"""# Results across tokenizers: routing per token, in bits per byte

Regenerate with `python tools/results_cross.py` (this page: `{' '.join(sys.argv[1:]) or 'no arguments'}`,
{seconds / 60:.1f} minutes on this machine) after `python tools/build_demo.py --cross`. Teachers are
the demo's three specialists retrained with tokenizers of their own (code: 2048-token byte-level
BPE; prose: 5000-token SentencePiece with byte fallback; math: 3072-token BPE that splits
digits); the student uses the demo's 4096-token byte-level BPE. Every student has the same
architecture ({base['student']['from_config']['overrides']}), {base['train']['steps']} steps of
{base['train']['micro_batch_size']} x {base['data']['seq_len']} tokens, seeds {args.seeds}. Cells: held-out bits
per byte (each model on its own tokens of the same text), mean ± standard deviation over seeds;
lower is better. A comparison counts as a win only if it holds on every seed.

{chr(10).join(lines)}

## Verdict

{chr(10).join(verdict)}
"""
    args.out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
