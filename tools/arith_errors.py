"""Where a student goes wrong on the arithmetic task, and whether the teacher could lead it back.

For every held-out problem the student answers wrong (greedy), the first token where its answer
leaves the worked answer (tools/arith_task.py) is found. The teacher then continues greedily from
the student's own prefix up to and with that token: if the teacher's continuation still ends with
the right sum, the teacher recovers from that mistake, and on-policy samples (which reach such
prefixes; the data never does) could teach the student to recover too. Off-policy and on-policy
give the same teacher distribution at the first wrong token itself: the prefix before it is the
data's.

    python tools/arith_errors.py runs/results_onpolicy/warm150-s0/student   # after results_onpolicy.py --warm-steps 150

Prints the count of wrong answers, how many of them the teacher recovers from, and the first few.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))

import arith_task  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("student", type=Path, help="a saved student (a run's student/ folder)")
    parser.add_argument("--problems", type=int, default=300, help="held-out problems answered")
    parser.add_argument("--show", type=int, default=8, help="wrong answers printed")
    args = parser.parse_args()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(2)
    teacher_dir = arith_task.OUT / "teachers" / "arith"
    tokenizer = AutoTokenizer.from_pretrained(teacher_dir)
    teacher = AutoModelForCausalLM.from_pretrained(teacher_dir).eval()
    student = AutoModelForCausalLM.from_pretrained(args.student).eval()
    held = arith_task.problems()[1][: args.problems]
    wrong, recovered = 0, 0
    for (a, b), (prompt, answer) in zip(held, arith_task.greedy_answers(student, tokenizer, held)):
        text = tokenizer.decode(answer, skip_special_tokens=True)
        if arith_task.right_sum(text, a, b):
            continue
        wrong += 1
        gold = tokenizer(arith_task.worked(a, b), add_special_tokens=False)["input_ids"]
        ids = answer.tolist()
        first = next((i for i, (s, g) in enumerate(zip(ids, gold)) if s != g), min(len(ids), len(gold)))
        prefix = torch.cat([prompt, answer[: first + 1]])[None]
        with torch.no_grad():
            more = teacher.generate(prefix, attention_mask=torch.ones_like(prefix), max_new_tokens=40, do_sample=False,
                                    pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
        continued = tokenizer.decode(more[0, len(prompt):], skip_special_tokens=True)
        back = arith_task.right_sum(continued, a, b)
        recovered += back
        if wrong <= args.show:
            print(f"{a}+{b}: student {text!r}, worked {arith_task.worked(a, b)!r}; first wrong token "
                  f"{tokenizer.decode(answer[first: first + 1])!r}; the teacher from there: {continued!r} "
                  f"({'recovers' if back else 'does not recover'})")
    print(f"{wrong} of {len(held)} answers wrong; the teacher, continuing from the student's first wrong token, "
          f"ends with the right sum on {recovered} of them")


if __name__ == "__main__":
    main()
