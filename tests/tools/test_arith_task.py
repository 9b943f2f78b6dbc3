"""The arithmetic task's data (tools/arith_task.py): worked answers compute the sum, the held-out
problems never train, and the answers-only set asks the same problems in the same order."""

from __future__ import annotations

import json
import sys
from pathlib import Path

TOOLS = Path(__file__).resolve().parents[2] / "tools"
sys.path.insert(0, str(TOOLS))

import arith_task  # noqa: E402
import results_onpolicy  # noqa: E402


def rows(path: Path) -> list[list[dict]]:
    return [json.loads(line)["messages"] for line in path.read_text().splitlines()]


def test_worked_answers_add_digit_by_digit_and_end_with_the_sum():
    assert arith_task.worked(47, 38) == "7+8=15 c1; 4+3+1=8; =85"
    assert arith_task.worked(90, 9) == "0+9=9; 9+0=9; =99"
    for a, b in [(0, 0), (99, 99), (5, 95), (50, 50)]:
        for text in (arith_task.worked(a, b), arith_task.answer_only(a, b)):
            assert int(arith_task.ANSWER.search(text).group(1)) == a + b


def test_the_data_files_hold_out_a_tenth_and_the_answers_only_set_mirrors_the_worked_one(tmp_path):
    arith_task.write_data(tmp_path)
    train, held, answers = (rows(tmp_path / f"{name}.jsonl") for name in ("train", "eval", "train_answers"))
    assert (len(train), len(held), len(answers)) == (9000, 1000, 9000)
    train_prompts = {row[0]["content"] for row in train}
    assert not train_prompts & {row[0]["content"] for row in held}
    for worked_row, answer_row in zip(train, answers):
        assert worked_row[0] == answer_row[0]  # the same user turn, in the same order
        a, b = map(int, worked_row[0]["content"].rstrip("=").split("+"))
        assert answer_row[1] == {"role": "assistant", "content": f"={a + b}"}
        assert worked_row[1]["content"].endswith(answer_row[1]["content"])


def test_the_arms_differ_only_in_lmbda_the_router_and_the_data_file(tmp_path):
    worked = results_onpolicy.recipe_dict(1.0, "domain", 0, 10, tmp_path)
    answers = results_onpolicy.recipe_dict(1.0, "domain", 0, 10, tmp_path, data="answers")
    assert worked["data"]["train"][0]["path"].endswith("/data/train.jsonl")
    assert answers["data"]["train"][0]["path"].endswith("/data/train_answers.jsonl")
    answers["data"]["train"][0]["path"] = worked["data"]["train"][0]["path"]
    assert answers == worked
