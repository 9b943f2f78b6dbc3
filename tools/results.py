"""Regenerate docs/RESULTS.md: does per-token routing combine the specialists' strengths?

    python tools/results.py                      # full table, 2 seeds (about 20-30 min on 2 cores)
    python tools/results.py --steps 40 --seeds 0 --out /tmp/RESULTS.md   # a quick look

Every student below has the same size, steps, tokens and seed set; only the teachers and the
routing differ. Held-out perplexity is token-weighted per domain (merge_distill.evaluate).
Needs the demo assets (python tools/build_demo.py).
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

from merge_distill.engine import run  # noqa: E402
from merge_distill.distributed import accelerator_for  # noqa: E402
from merge_distill.evaluate import evaluate_run  # noqa: E402
from merge_distill.recipe import load_recipe  # noqa: E402

ROUTED = {
    "uniform blend": {"kind": "uniform"},
    "ce routing": {"kind": "ce", "tau": 0.5},
    "learned routing": {"kind": "learned", "gate": "mlp", "hidden": 64, "lr": 3.0e-3},
    "domain routing": {"kind": "domain", "weights": {"code": "code", "prose": "prose", "math": "math"}},
}


def configs(base: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """name -> recipe dict; all share the student config, data, steps and seed."""
    out: dict[str, dict[str, Any]] = {}
    for teacher in base["teachers"]:
        single = json.loads(json.dumps(base))
        single["teachers"] = [teacher]
        single["routing"] = {"kind": "uniform"}
        out[f"single teacher: {teacher['name']}"] = single
    for name, routing in ROUTED.items():
        routed = json.loads(json.dumps(base))
        routed["routing"] = routing
        out[name] = routed
    plain = json.loads(json.dumps(base))
    plain["routing"] = {"kind": "uniform"}
    plain["loss"] = {"kind": "forward_kl", "hard_label_weight": 1.0}
    out["data only (plain CE)"] = plain
    return out


def train_and_eval(recipe_dict: dict[str, Any], work: Path, tag: str) -> dict[str, Any]:
    path = work / f"{tag}.yaml"
    path.write_text(yaml.safe_dump(recipe_dict, sort_keys=False))
    recipe = load_recipe(path)
    run_dir = run(recipe, overwrite=True)
    return json.loads((run_dir / "eval.json").read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", type=Path, default=ROOT / "recipes" / "quickstart.yaml")
    parser.add_argument("--steps", type=int, default=None, help="override train.steps")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "RESULTS.md")
    parser.add_argument("--runs", type=Path, default=ROOT / "runs" / "results")
    args = parser.parse_args()

    base_recipe = load_recipe(args.recipe)
    base = base_recipe.model_dump(mode="json")
    code_teacher = next(t["model"] for t in base["teachers"] if t["name"] == "code")
    base["student"]["from_config"]["base"] = code_teacher  # same student architecture everywhere
    base["report"] = {"eval_at_end": True, "eval_teachers": False}
    if args.steps:
        base["train"]["steps"] = args.steps
    started = time.time()
    teacher_eval = evaluate_run(base_recipe, accelerator_for(base_recipe), None, teachers=True)
    domains = teacher_eval["domains"]
    results: dict[str, list[dict[str, float]]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, recipe_dict in configs(base).items():
            for seed in args.seeds:
                tag = name.replace(" ", "_").replace(":", "").replace("(", "").replace(")", "") + f"-s{seed}"
                recipe_dict["train"]["seed"] = seed
                recipe_dict["output"]["dir"] = str(args.runs / tag)
                print(f"== {name}, seed {seed}", flush=True)
                ev = train_and_eval(recipe_dict, Path(tmp), tag)
                results.setdefault(name, []).append(ev["rows"][0]["ppl"])
    write_markdown(args, base, teacher_eval, domains, results, time.time() - started)


def fmt(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.2f}"
    return f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}"


def write_markdown(args, base, teacher_eval, domains, results, seconds) -> None:
    header = "| model | " + " | ".join(domains) + " | mean over domains |"
    lines = [header, "|" + "---|" * (len(domains) + 2)]
    for row in teacher_eval["rows"]:
        ppl = row["ppl"]
        lines.append(f"| (a) teacher `{row['model']}` | " + " | ".join(f"{ppl[d]:.2f}" for d in domains)
                     + f" | {statistics.mean(ppl[d] for d in domains):.2f} |")
    means: dict[str, list[float]] = {}
    for name, per_seed in results.items():
        means[name] = [statistics.mean(p[d] for d in domains) for p in per_seed]
        cells = [fmt([p[d] for p in per_seed]) for d in domains]
        lines.append(f"| student: {name} | " + " | ".join(cells) + f" | {fmt(means[name])} |")
    best = min(means, key=lambda n: statistics.mean(means[n]))
    singles = {n: statistics.mean(v) for n, v in means.items() if n.startswith("single")}
    routed = {n: statistics.mean(means[n]) for n in ("ce routing", "learned routing", "domain routing") if n in means}
    uniform = statistics.mean(means["uniform blend"]) if "uniform blend" in means else float("nan")
    verdict = []
    for name, value in routed.items():
        beats_uniform = value < uniform
        beats_singles = all(value < s for s in singles.values())
        verdict.append(f"- **{name}**: mean perplexity {value:.2f} — "
                       f"{'beats' if beats_uniform else 'does not beat'} the uniform blend ({uniform:.2f}), "
                       f"{'beats' if beats_singles else 'does not beat'} every single-teacher student "
                       f"(best single: {min(singles.values()):.2f}).")
    gaps = []
    teacher_ppl = {r["model"]: r["ppl"] for r in teacher_eval["rows"]}
    for name in routed:
        per_domain = {d: statistics.mean(p[d] for p in results[name]) for d in domains}
        gaps.append(f"- {name}: " + ", ".join(
            f"{d} {per_domain[d]:.2f} vs specialist {teacher_ppl[d][d]:.2f}" for d in domains if d in teacher_ppl))
    text = f"""# Results: combining specialist teachers on real text

Regenerate with `python tools/results.py` (this table: `{' '.join(sys.argv[1:]) or 'no arguments'}`,
{seconds / 60:.1f} minutes on this machine). Teachers are the three specialists that
`tools/build_demo.py` trains from scratch (code: Python standard library; prose; math). Every
student has the same architecture ({base['student']['from_config']['overrides']}), is trained
for {base['train']['steps']} steps of {base['train']['micro_batch_size']} x {base['data']['seq_len']} tokens
from the recipe `{args.recipe.name}` with seeds {args.seeds}; cells are held-out perplexity
(token-weighted, lower is better), mean ± standard deviation over seeds.

{chr(10).join(lines)}

Lowest mean over domains: **{best}**.

## Does routing win?

{chr(10).join(verdict)}

## How close does the routed student come to each specialist on its own domain?

{chr(10).join(gaps)}
"""
    args.out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
