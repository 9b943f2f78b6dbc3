"""A task with checkable answers for on-policy distillation: two-digit addition with worked answers.

    python tools/arith_task.py        # after `make demo`: .cache/arith (data + the teacher `arith`)

Problems are a + b with a, b in 0..99. A seeded 10% of the pairs is held out: the teacher and the
students never train on them. Each problem is a chat:
- user: "47+38=";
- assistant: a worked answer, digit by digit with the carry, "7+8=15 c1; 4+3+1=8; =85".

data/train.jsonl holds the worked answers (the teacher's training data). data/train_answers.jsonl
holds the same problems with the computed answer only ("=85", the worked answer's last step), as
most question-answer sets are: the students' data when the teacher's worked answers are not at
hand (tools/results_onpolicy.py --data answers).

The specialist teacher `arith` has the demo teachers' architecture and tokenizer
(tools/build_demo.py, so it blends with the demo's `code` and `prose` teachers). It is trained
from scratch on the rendered conversations. The script prints its greedy exact match on 300
held-out problems: the issue asks for >= 60%.

`exact_match` and `answer_reverse_kl` score any model on held-out problems
(tools/results_onpolicy.py uses them).
"""

from __future__ import annotations

import argparse
import json
import random
import re
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))

import build_demo  # noqa: E402

OUT = ROOT / ".cache" / "arith"
DEMO = ROOT / ".cache" / "demo"
ANSWER = re.compile(r"=(\d+)\s*$")


def worked(a: int, b: int) -> str:
    """The worked answer: ones digit with carry, then tens, then the result."""
    ones = a % 10 + b % 10
    tens = a // 10 + b // 10 + ones // 10
    carry = f" c{ones // 10}" if ones >= 10 else ""
    return f"{a % 10}+{b % 10}={ones}{carry}; {a // 10}+{b // 10}{'+1' if ones >= 10 else ''}={tens}; ={a + b}"


def problems(seed: int = 0) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    """(train pairs, held-out pairs): every (a, b) in 0..99 x 0..99, 10% held out, seeded."""
    pairs = [(a, b) for a in range(100) for b in range(100)]
    random.Random(seed).shuffle(pairs)
    cut = len(pairs) // 10
    return pairs[cut:], pairs[:cut]


def answer_only(a: int, b: int) -> str:
    """The computed answer alone, written as the worked answer's last step."""
    return f"={a + b}"


def conversation(a: int, b: int, answer=worked) -> list[dict[str, str]]:
    return [{"role": "user", "content": f"{a}+{b}="}, {"role": "assistant", "content": answer(a, b)}]


def write_data(out: Path) -> None:
    """train.jsonl and eval.jsonl (worked answers), train_answers.jsonl (computed answers only)."""
    train, held = problems()
    out.mkdir(parents=True, exist_ok=True)
    for name, pairs, answer in (("train", train, worked), ("eval", held, worked), ("train_answers", train, answer_only)):
        with open(out / f"{name}.jsonl", "w", encoding="utf-8") as fh:
            for a, b in pairs:
                fh.write(json.dumps({"messages": conversation(a, b, answer)}) + "\n")


@torch.no_grad()
def greedy_answers(model, tokenizer, pairs: list[tuple[int, int]], max_new_tokens: int = 40,
                   batch: int = 50) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(prompt ids, greedy answer ids up to and with EOS) for every problem; prompts are the user
    turn and the assistant header, the recipe's on-policy prompt."""
    out = []
    for i in range(0, len(pairs), batch):
        prompts = [tokenizer.apply_chat_template(conversation(a, b)[:1], tokenize=True, add_generation_prompt=True)
                   for a, b in pairs[i: i + batch]]
        prompts = [p["input_ids"] if isinstance(p, dict) or hasattr(p, "keys") else p for p in prompts]
        width = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), width), tokenizer.pad_token_id)
        mask = torch.zeros_like(ids)
        for r, p in enumerate(prompts):
            ids[r, width - len(p):] = torch.tensor(p)
            mask[r, width - len(p):] = 1
        gen = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)[:, width:]
        for p, row in zip(prompts, gen):
            ends = (row == tokenizer.eos_token_id).nonzero()
            out.append((torch.tensor(p), row[: int(ends[0]) + 1] if len(ends) else row))
    return out


def right_sum(text: str, a: int, b: int) -> bool:
    """Whether an answer's text ends with "=<a + b>"."""
    found = ANSWER.search(text)
    return bool(found) and int(found.group(1)) == a + b


def exact_match(model, tokenizer, pairs: list[tuple[int, int]], answers=None) -> float:
    """Share of problems whose greedy answer ends with "=<a + b>"."""
    answers = answers or greedy_answers(model, tokenizer, pairs)
    right = sum(right_sum(tokenizer.decode(completion, skip_special_tokens=True), a, b)
                for (a, b), (_, completion) in zip(pairs, answers))
    return right / len(pairs)


@torch.no_grad()
def answer_reverse_kl(student, teacher, answers) -> float:
    """KL(student || teacher) per token of the student's greedy answers (nats), teacher-forced on
    prompt + answer: the teacher's disagreement where the student actually goes."""
    total, count = 0.0, 0
    for prompt, completion in answers:
        if len(completion) == 0:
            continue
        ids = torch.cat([prompt, completion])[None]
        at = slice(len(prompt) - 1, ids.shape[1] - 1)  # the positions that predict the answer's tokens
        logq = torch.log_softmax(student(input_ids=ids).logits[0, at].float(), -1)
        logp = torch.log_softmax(teacher(input_ids=ids).logits[0, at].float(), -1)
        total += float((logq.exp() * (logq - logp)).sum())
        count += len(completion)
    return total / max(count, 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--check", type=int, default=300, help="held-out problems scored at the end")
    args = parser.parse_args()
    if not (DEMO / "tokenizer").is_dir():
        raise SystemExit("the demo's tokenizer is missing: run `make demo` first")
    from transformers import AutoTokenizer

    started = time.perf_counter()
    write_data(args.out / "data")
    tokenizer = AutoTokenizer.from_pretrained(DEMO / "tokenizer")
    train, held = problems()
    texts = [tokenizer.apply_chat_template(conversation(a, b), tokenize=False) for a, b in train]
    stream = build_demo.token_stream(texts, tokenizer)
    params = replace(build_demo.BuildParams(), steps=args.steps, batch_size=16, seq_len=96, lr=3e-3, warmup_steps=50)
    torch.set_num_threads(2)
    model = build_demo.train_teacher(stream, params, tokenizer, seed=0, tag="arith")
    teacher_dir = args.out / "teachers" / "arith"
    model.save_pretrained(teacher_dir)
    tokenizer.save_pretrained(teacher_dir)
    score = exact_match(model, tokenizer, held[: args.check])
    print(f"teacher arith: {stream.numel()} training tokens, {args.steps} steps, "
          f"held-out exact match {score:.1%} on {args.check} problems ({time.perf_counter() - started:.0f} s)")


if __name__ == "__main__":
    main()
