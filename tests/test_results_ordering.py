"""Slow: on the real-text demo, per-token routing beats the uniform blend and single teachers.

Loose version of docs/RESULTS.md (tools/results.py): one seed, 80 steps, mean held-out
perplexity over the three domains. Builds the demo assets first if they are missing (minutes).
"""

from __future__ import annotations

import statistics
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))


def test_routed_student_beats_uniform_and_single_teachers(tmp_path):
    subprocess.run([sys.executable, str(ROOT / "tools" / "build_demo.py")], check=True)
    import results

    from merge_distill.recipe import load_recipe

    base = load_recipe(ROOT / "recipes" / "quickstart.yaml").model_dump(mode="json")
    base["student"]["from_config"]["base"] = next(t["model"] for t in base["teachers"] if t["name"] == "code")
    base["report"] = {"eval_at_end": True, "eval_teachers": False}
    base["train"]["steps"] = 80
    base["data"]["eval_tokens"] = 8192
    mean_ppl = {}
    for name, recipe in results.configs(base).items():
        if name in ("learned routing", "data only (plain CE)"):
            continue
        recipe["output"]["dir"] = str(tmp_path / name.replace(" ", "_").replace(":", ""))
        ppl = results.train_and_eval(recipe, tmp_path, name.replace(" ", "_").replace(":", ""))["rows"][0]["ppl"]
        mean_ppl[name] = statistics.mean(ppl.values())
    singles = [v for k, v in mean_ppl.items() if k.startswith("single")]
    assert mean_ppl["ce routing"] < mean_ppl["uniform blend"], mean_ppl
    assert mean_ppl["domain routing"] < mean_ppl["uniform blend"], mean_ppl
    assert mean_ppl["ce routing"] < min(singles), mean_ppl
