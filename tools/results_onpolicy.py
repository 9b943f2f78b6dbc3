"""Regenerate docs/RESULTS_ONPOLICY.md: does on-policy distillation beat off-policy on a task with
checkable answers, and does per-token routing beat the uniform blend there?

    python tools/arith_task.py           # once, after `make demo`: the arithmetic data and teacher
    python tools/results_onpolicy.py     # the table (3 seeds): docs/RESULTS_ONPOLICY.md
    python tools/results_onpolicy.py --data answers --out docs/RESULTS_ONPOLICY_ANSWERS.md
    python tools/results_onpolicy.py --warm-steps 150 --out docs/RESULTS_ONPOLICY_WARM.md

Teachers:
- `arith`, the specialist (tools/arith_task.py: two-digit addition with worked answers);
- `code` and `prose` from the demo, teachers of other domains.

Students start from layers 0 and 3 of `arith` (a truncated copy, as in classic distillation), and
train on the arithmetic conversations for the same steps with the same divergence (reverse KL, no
hard label). With --warm-steps N, that truncated copy is first distilled off-policy for N steps
(domain routing, one run per seed), and every arm starts from it, as GKD's students start from a
supervised checkpoint: on-policy samples from a student that cannot yet answer teach little.
Only two settings differ between arms:
- onpolicy.lmbda: 0 off-policy, 0.5 half, 1 all micro-batches sampled by the student;
- routing: `ce` (per token, by each teacher's NLL of the token), `domain` (the task's rows to
  `arith`) or the uniform blend.

--data names the students' conversations (the on-policy arms read only their prompts):
- worked (default): the teacher's own worked answers, which are also its greedy answers, so the
  off-policy arms are sequence-level KD. Sampled answers are about as long, so the arms see about
  the same number of target tokens;
- answers: the computed answer only ("=85"), as most question-answer sets are
  (docs/RESULTS_ONPOLICY_ANSWERS.md). Its rows are a quarter as long as a sampled answer, so one
  more arm gives off-policy 4x the steps: as many target tokens as the on-policy arm.

Each student is scored on 300 held-out problems, greedy:
- exact match (the final "=<sum>");
- the `arith` teacher's reverse KL on the student's own answers (nats per answer token);
- and the page shows the seed-0 students' answers to the first 3 problems.
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import time
from pathlib import Path
from typing import NamedTuple

import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))

import arith_task  # noqa: E402
from merge_distill.engine import run  # noqa: E402
from merge_distill.recipe import load_recipe  # noqa: E402

class Arm(NamedTuple):
    name: str
    lmbda: float
    router: str
    steps_factor: int = 1  # trains --steps x this


ARMS = [
    Arm("off-policy (lmbda 0), ce routing", 0.0, "ce"),
    Arm("on-policy lmbda 0.5, ce routing", 0.5, "ce"),
    Arm("on-policy lmbda 1, ce routing", 1.0, "ce"),
    Arm("on-policy lmbda 1, domain routing", 1.0, "domain"),
    Arm("on-policy lmbda 1, uniform blend", 1.0, "uniform"),
    Arm("off-policy (lmbda 0), domain routing", 0.0, "domain"),
    Arm("on-policy lmbda 0.5, domain routing", 0.5, "domain"),
]
# With answers-only data an off-policy row has ~4 target tokens against ~18 per sampled answer: this
# arm gives off-policy (domain routing) 4x the steps, as many target tokens as the on-policy arm.
MATCHED = Arm("off-policy (lmbda 0), domain routing, 4x the steps", 0.0, "domain", 4)
DEFAULT_OUT = ROOT / "docs" / "RESULTS_ONPOLICY.md"
WARM = "warm start (off-policy, domain routing; every arm starts here)"
ROUTERS = {"ce": {"kind": "ce", "tau": 0.5}, "uniform": {"kind": "uniform"},
           "domain": {"kind": "domain", "weights": {"math": "arith"}}}  # the task's rows to its specialist


DATA = {"worked": "train.jsonl", "answers": "train_answers.jsonl"}  # the students' data (--data)
STUDENT_DATA = {
    "worked": ["Students' data: the training problems with the teacher's own worked answers (data/train.jsonl), what "
               "it writes itself (below: to the letter on held-out problems), so the off-policy arms are sequence-level "
               "KD. Off-policy arms train on them; on-policy arms read only their prompts."],
    "answers": ["Students' data: the training problems with the computed answer only (`=85`, data/train_answers.jsonl), "
                "as most question-answer sets are: the teacher's worked answers are not at hand. Off-policy arms train "
                "on these rows; on-policy arms read only their prompts, so they are the same runs as with the worked "
                "answers."],
}


def recipe_dict(lmbda: float, router: str, seed: int, steps: int, out: Path, start: Path | None = None,
                data: str = "worked") -> dict:
    """One arm's recipe; the student starts from `start` (a saved student: the warm start), else
    from layers 0 and 3 of `arith`. `data` names the students' training conversations (DATA)."""
    demo, arith = ROOT / ".cache" / "demo", arith_task.OUT
    return {
        "name": "arith_onpolicy",
        "teachers": [{"name": "arith", "model": str(arith / "teachers" / "arith")},
                     {"name": "code", "model": str(demo / "teachers" / "code")},
                     {"name": "prose", "model": str(demo / "teachers" / "prose")}],
        "student": {"model": str(start)} if start else {"from_teacher": {"teacher": "arith", "layers": [0, 3]}},
        "data": {"seq_len": 64, "packing": False,
                 "train": [{"type": "jsonl", "path": str(arith / "data" / DATA[data]), "field": "messages",
                            "format": "chat", "domain": "math"}]},
        "routing": ROUTERS[router],
        "loss": {"kind": "reverse_kl", "temperature": 1.0},
        "onpolicy": {"lmbda": lmbda, "max_new_tokens": 32, "temperature": 1.0, "samples": 0},
        "train": {"steps": steps, "micro_batch_size": 16, "lr": 1e-3, "warmup_steps": 10, "seed": seed,
                  "log_every": 50},
        "report": {"eval_at_end": False},
        "output": {"dir": str(out)},
    }


class Scored(NamedTuple):
    exact_match: float
    reverse_kl: float  # the `arith` teacher's, on the student's greedy answers (nats per answer token)
    tokens: int  # the run's target tokens, data and sampled, summed over its steps (metrics.jsonl)
    examples: list[str]  # the greedy answers to the first EXAMPLES held-out problems


EXAMPLES = 3


def score(run_dir: Path, teacher, tokenizer, held: list[tuple[int, int]]) -> Scored:
    from transformers import AutoModelForCausalLM

    student = AutoModelForCausalLM.from_pretrained(run_dir / "student").eval()
    answers = arith_task.greedy_answers(student, tokenizer, held)
    tokens = sum(row["tokens"] for row in metric_rows(run_dir))
    examples = [tokenizer.decode(completion, skip_special_tokens=True) for _, completion in answers[:EXAMPLES]]
    return Scored(arith_task.exact_match(student, tokenizer, held, answers),
                  arith_task.answer_reverse_kl(student, teacher, answers), tokens, examples)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--warm-steps", type=int, default=0,
                        help="first train one off-policy student per seed for this many steps (domain routing), and "
                        "start every arm from it, as GKD starts from a supervised student (0: no warm start)")
    parser.add_argument("--data", choices=sorted(DATA), default="worked",
                        help="the students' conversations: the teacher's worked answers, or the computed answers only "
                        "(on-policy arms read only their prompts)")
    parser.add_argument("--problems", type=int, default=300, help="held-out problems scored")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--runs", type=Path, default=ROOT / "runs" / "results_onpolicy")
    parser.add_argument("--only", help="train these arms only (comma-separated numbers from 1, in table order) and "
                        "write no page: to share the arms between processes; a later full call reuses their runs")
    args = parser.parse_args()
    args.runs = args.runs.resolve()  # a recipe's relative output.dir is read from the recipe's folder
    if not (arith_task.OUT / "teachers" / "arith").is_dir():
        raise SystemExit("the arithmetic teacher is missing: run `python tools/arith_task.py` first")
    arith_task.write_data(arith_task.OUT / "data")  # seeded: rewrites the same files, adds a missing one
    from rich.console import Console
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(2)
    started = time.time()
    teacher_dir = arith_task.OUT / "teachers" / "arith"
    teacher = AutoModelForCausalLM.from_pretrained(teacher_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(teacher_dir)
    held = arith_task.problems()[1][: args.problems]
    teacher_answers = arith_task.greedy_answers(teacher, tokenizer, held)
    teacher_em = arith_task.exact_match(teacher, tokenizer, held, teacher_answers)
    teacher_worked = sum(tokenizer.decode(completion, skip_special_tokens=True).strip() == arith_task.worked(a, b)
                         for (a, b), (_, completion) in zip(held, teacher_answers))  # the data's answer, to the letter
    arms = ARMS + ([MATCHED] if args.data == "answers" else [])
    results: dict[str, dict[int, Scored]] = {arm.name: {} for arm in arms}
    quiet = Console(file=io.StringIO())
    drift: dict[str, dict[int, tuple[float, float, float, float]]] = {}
    reused = 0
    chosen = [arms[int(i) - 1] for i in args.only.split(",")] if args.only else arms

    def trained(tag: str, recipe: dict) -> Path:
        nonlocal reused
        path, run_dir = args.runs / f"{tag}.yaml", args.runs / tag
        path.parent.mkdir(parents=True, exist_ok=True)
        text = yaml.safe_dump(recipe)
        if finished(run_dir, path, text):  # a run this recipe already finished is reused, not retrained
            reused += 1
            return run_dir
        path.write_text(text)
        return run(load_recipe(path), overwrite=True, console=quiet)

    starts: dict[int, Path | None] = dict.fromkeys(args.seeds)
    prefix = "" if args.data == "worked" else f"{args.data}-"
    if args.warm_steps:
        results = {WARM: {}, **results}
        for seed in args.seeds:
            tag = prefix + f"warm{args.warm_steps}-s{seed}"
            warm = trained(tag, recipe_dict(0.0, "domain", seed, args.warm_steps, args.runs / tag, data=args.data))
            starts[seed] = warm / "student"
            results[WARM][seed] = score(warm, teacher, tokenizer, held)
            print(f"{WARM}, seed {seed}: exact match {results[WARM][seed][0]:.1%}", flush=True)
    for name, lmbda, router, factor in chosen:
        for seed in args.seeds:
            tag = (prefix + f"lmbda{lmbda:g}-{router}" + (f"-x{factor}" if factor > 1 else "")
                   + (f"-warm{args.warm_steps}" if args.warm_steps else "") + f"-s{seed}")
            run_dir = trained(tag, recipe_dict(lmbda, router, seed, args.steps * factor, args.runs / tag,
                                               starts[seed], args.data))
            results[name][seed] = score(run_dir, teacher, tokenizer, held)
            if lmbda > 0:
                drift.setdefault(name, {})[seed] = arith_drift(run_dir)
            print(f"{name}, seed {seed}: exact match {results[name][seed][0]:.1%}, "
                  f"reverse KL {results[name][seed][1]:.3f}", flush=True)
    if not args.only:
        write_markdown(args, (teacher_em, teacher_worked), results, drift, time.time() - started, reused)


def metric_rows(run_dir: Path) -> list[dict]:
    """The run's metrics.jsonl, one dict per step."""
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def arith_drift(run_dir: Path, window: int = 10) -> tuple[float, float, float, float]:
    """From the run's metrics.jsonl: `arith`'s routing share on the sampled tokens and its reverse
    KL on them, each averaged over the first and the last `window` steps with samples."""
    rows = [row["on_policy"] for row in metric_rows(run_dir) if row["on_policy"]["tokens"]]

    def mean(part: list[dict], key: str) -> float:
        return sum(r[key]["arith"] for r in part) / len(part)

    first, last = rows[:window], rows[-window:]
    return mean(first, "share"), mean(last, "share"), mean(first, "reverse_kl"), mean(last, "reverse_kl")


def finished(run_dir: Path, path: Path, text: str) -> bool:
    """The run of exactly this recipe completed already (its recipe file and run.json say so)."""
    facts = run_dir / "run.json"
    return (path.is_file() and path.read_text() == text and facts.is_file()
            and json.loads(facts.read_text()).get("status") == "complete")


def verdict(results: dict, seeds: list[int], better: str, worse: str) -> str:
    wins = [results[better][s][0] > results[worse][s][0] for s in seeds]
    if all(wins):
        return f"yes, on every seed ({', '.join(str(s) for s in seeds)})"
    return f"no: it wins on {sum(wins)} of {len(seeds)} seeds"


def cell(text: str, width: int = 40) -> str:
    """A student's answer as a table cell: one line, no column bar, at most `width` characters."""
    text = text.replace("\n", "\\n").replace("|", "\\|").replace("`", "'")
    return f"`{text[:width]}`" + ("…" if len(text) > width else "")


def shown(path: Path) -> str:
    """A path as the page names it: relative to the repository when inside it."""
    path = path.resolve()
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def write_markdown(args, teacher: tuple[float, int], results: dict, drift: dict, seconds: float, reused: int) -> None:
    seeds = args.seeds
    off, half, full, domain, uniform, off_domain, half_domain = (arm.name for arm in ARMS)
    lines = [
        "# Results: on-policy distillation on a task with checkable answers",
        "",
        f"Regenerate with `python tools/results_onpolicy.py` (this page: `--steps {args.steps} --seeds "
        f"{' '.join(map(str, seeds))}{f' --warm-steps {args.warm_steps}' if args.warm_steps else ''}"
        f"{f' --data {args.data}' if args.data != 'worked' else ''}"
        f"{f' --problems {args.problems}' if args.problems != 300 else ''}"
        f"{f' --out {shown(args.out)}' if args.out.resolve() != DEFAULT_OUT else ''}`, {seconds / 60:.1f} minutes for the call that wrote it, which reused "
        f"{reused} finished runs of the same recipes), after `python tools/arith_task.py`.",
        "",
        "Task: two-digit addition with worked answers (tools/arith_task.py), 10% of the 10,000 problems held out.",
        "",
        *STUDENT_DATA[args.data],
        "",
        "Teachers:",
        f"- `arith`, the specialist, at **{teacher[0]:.1%}** greedy exact match on the {args.problems} held-out "
        f"problems; its greedy answer is the worked answer, to the letter, on {teacher[1]} of them;",
        "- the demo's `code` and `prose`, teachers of other domains.",
        "",
        (f"Every student starts from layers 0 and 3 of `arith` and trains for {args.steps} steps of 16 conversations."
         if not args.warm_steps else
         f"Per seed, one warm start: layers 0 and 3 of `arith` distilled off-policy for {args.warm_steps} steps of 16 "
         "conversations (domain routing), as GKD starts from a supervised student. Every arm starts from it and trains "
         f"{args.steps} more steps of 16 conversations, with the same data order."),
        "Every arm uses reverse KL with no hard label, and the sampled answers stop at EOS or 32 tokens.",
        "",
        "Cells give the student's exact match and the `arith` teacher's reverse KL on the student's own greedy",
        f"answers (nats per answer token), on {args.problems} held-out problems, per seed:",
        "",
        "| student | " + " | ".join(f"seed {s}: exact match, reverse KL" for s in seeds)
        + " | mean exact match | target tokens per run |",
        "|---|" + "---|" * len(seeds) + "---|---:|",
    ]
    for name in results:
        cells = " | ".join(f"{results[name][s][0]:.1%}, {results[name][s][1]:.3f}" for s in seeds)
        mean = sum(results[name][s][0] for s in seeds) / len(seeds)
        tokens = sum(results[name][s][2] for s in seeds) / len(seeds)
        lines.append(f"| {name} | {cells} | {mean:.1%} | {tokens:,.0f} |")
    lines += ["", "Target tokens per run: the data and sampled tokens the run's loss covered, summed over its steps "
              "(metrics.jsonl), mean over seeds."]
    lines += [
        "",
        "## Verdicts (exact match, decided seed by seed)",
        "",
        f"- On-policy lmbda 0.5 beats off-policy: {verdict(results, seeds, half, off)}.",
        f"- On-policy lmbda 1 (ce routing) beats off-policy: {verdict(results, seeds, full, off)}.",
        f"- On-policy lmbda 1 (domain routing) beats off-policy: {verdict(results, seeds, domain, off)}.",
        f"- On-policy lmbda 0.5 (domain routing) beats off-policy: {verdict(results, seeds, half_domain, off)}; "
        f"beats off-policy with the same domain routing: {verdict(results, seeds, half_domain, off_domain)}.",
        f"- On-policy lmbda 1 (domain routing) beats off-policy with the same domain routing: "
        f"{verdict(results, seeds, domain, off_domain)}.",
        *([f"- On-policy lmbda 1 (domain routing) beats off-policy with the same routing and {MATCHED.steps_factor}x "
           f"the steps: {verdict(results, seeds, domain, MATCHED.name)}."] if MATCHED.name in results else []),
        f"- Routed on-policy beats the uniform-blend on-policy student: ce routing "
        f"{verdict(results, seeds, full, uniform)}; domain routing {verdict(results, seeds, domain, uniform)}.",
    ]
    first = seeds[0]
    problems = ", ".join(f"{a}+{b}" for a, b in arith_task.problems()[1][:EXAMPLES])
    lines += ["", f"## What the students answer (seed {first}, greedy, the first {EXAMPLES} held-out problems: {problems})",
              "", "| student | " + " | ".join(f"answer {i + 1}" for i in range(EXAMPLES)) + " |",
              "|---|" + "---|" * EXAMPLES]
    for name in results:
        lines.append(f"| {name} | " + " | ".join(cell(text) for text in results[name][first].examples) + " |")
    lines += [
        "",
        "## Who was trusted on the samples (from each run's metrics.jsonl)",
        "",
        "`arith`'s routing share on the sampled tokens and its reverse KL on them, mean of the first and of the",
        "last 10 steps with samples, per seed:",
        "",
        "| student | " + " | ".join(f"seed {s}: share first → last, reverse KL first → last" for s in seeds) + " |",
        "|---|" + "---|" * len(seeds),
    ]
    for name, per_seed in drift.items():
        cells = " | ".join(f"{per_seed[s][0]:.2f} → {per_seed[s][1]:.2f}, {per_seed[s][2]:.2f} → {per_seed[s][3]:.2f}"
                           for s in seeds)
        lines.append(f"| {name} | {cells} |")
    lines.append("")
    args.out.write_text("\n".join(lines), encoding="utf-8")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
