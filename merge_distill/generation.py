"""Hearing what was distilled: the student (and its teachers) answering prompts.

`merge-distill sample RUN_DIR --prompts FILE` answers every prompt with the run's student and
teachers and grades every answer with every teacher: the mean NLL per token (nats) of the answer's
tokens under that teacher, given the prompt in the teacher's own tokens and chat template. Each
model renders a conversation with its own chat template (a model without one reads the turns'
text, one per line, and continues it). Sampling is seeded per (prompt, model), so a run is
deterministic under --seed; temperature 0 is greedy.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from rich.markup import escape
from rich.panel import Panel
from rich.table import Table
from transformers import PreTrainedTokenizerBase, TextStreamer

from merge_distill.distributed import accelerator_for
from merge_distill.errors import UserError
from merge_distill.evaluate import eval_teacher_names, load_saved_student
from merge_distill.models import load_model, load_tokenizer
from merge_distill.recipe import load_recipe
from merge_distill.report.build import write_report
from merge_distill.rundir import write_text_atomic
from merge_distill.schema import SELF_TEACHER, Recipe

Messages = list[dict[str, str]]


@dataclass
class Speaker:
    """One model that answers: its name, the model and its own tokenizer."""

    name: str
    model: Any
    tokenizer: PreTrainedTokenizerBase

    @property
    def context(self) -> int | None:
        return getattr(self.model.config, "max_position_embeddings", None)


@dataclass
class GenerationSettings:
    max_new_tokens: int = 128
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    seed: int = 0


def run_recipe(run_dir: Path) -> Recipe:
    """The recipe a run recorded; UserError when RUN_DIR holds no finished student."""
    if not (run_dir / "recipe.yaml").is_file():
        raise UserError(f"{run_dir} is not a run directory (no recipe.yaml); give the output.dir of a run")
    if not (run_dir / "student").is_dir():
        raise UserError(f"{run_dir}/student does not exist: the run did not finish; finish it with "
                        f"`merge-distill run {run_dir}/recipe.yaml --resume`")
    return load_recipe(run_dir / "recipe.yaml", check_files=False)


def load_speakers(run_dir: Path, student: bool, teachers: list[str]) -> list[Speaker]:
    """The student of RUN_DIR (if `student`) and the named teachers, on the CPU or the first GPU. A
    `self` teacher is the student's initial model (`student.model`); a student built from a teacher
    has none to load."""
    recipe = run_recipe(run_dir)
    known = {t.name: t for t in recipe.teachers}
    unknown = [n for n in teachers if n not in known]
    if unknown:
        raise UserError(f"--teacher {unknown[0]!r} is not a teacher of this run; its teachers are {sorted(known)}")
    accelerator = accelerator_for(recipe)
    out = []
    if student:
        model, tokenizer = load_saved_student(recipe, accelerator, run_dir / "student")
        out.append(Speaker("student", model.eval(), tokenizer))
    for name in teachers:
        spec = known[name]
        path, revision, trust = spec.model, spec.revision, spec.trust_remote_code
        if path == SELF_TEACHER:
            if recipe.student.model is None:
                raise UserError(f"teacher {name!r} is `self`: the student's initial weights, which a student built "
                                "from a teacher or a config does not keep; leave it out")
            path, revision, trust = recipe.student.model, recipe.student.revision, recipe.student.trust_remote_code
        model = load_model(path, revision, torch.float32, trust, f"teachers[{name}]").to(accelerator.device).eval()
        out.append(Speaker(name, model, load_tokenizer(path, revision, trust)))
    return out


def render(tokenizer: PreTrainedTokenizerBase, messages: Messages, answer: str | None = None) -> list[int]:
    """The conversation as the model's input ids: its chat template with the generation prompt
    (and the answer after it, for grading); without a template, the turns' text one per line."""
    if getattr(tokenizer, "chat_template", None):
        ids = tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=True)
        ids = list(ids["input_ids"] if hasattr(ids, "keys") else ids)  # a BatchEncoding in recent transformers
    else:
        ids = tokenizer("\n".join(m["content"] for m in messages) + "\n", add_special_tokens=True)["input_ids"]
    if answer is not None:
        ids = ids + tokenizer(answer, add_special_tokens=False)["input_ids"]
    return ids


def check_length(speaker: Speaker, ids: list[int], max_new_tokens: int, where: str) -> None:
    if speaker.context is not None and len(ids) + max_new_tokens > speaker.context:
        raise UserError(f"{where}: the prompt is {len(ids)} tokens for {speaker.name}, and with max_new_tokens "
                        f"{max_new_tokens} that passes its context of {speaker.context}; shorten the prompt or "
                        "lower --max-new-tokens")


@torch.inference_mode()
def answer(speaker: Speaker, messages: Messages, settings: GenerationSettings, streamer: Any = None) -> str:
    """The model's reply to the conversation (special tokens removed)."""
    ids = torch.tensor([render(speaker.tokenizer, messages)], device=speaker.model.device)
    torch.manual_seed(settings.seed)
    sampling = settings.temperature > 0
    tokenizer = speaker.tokenizer
    out = speaker.model.generate(
        input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=settings.max_new_tokens,
        do_sample=sampling, temperature=settings.temperature if sampling else None,
        top_p=settings.top_p if sampling else None, top_k=None, streamer=streamer,
        pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id)
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


@torch.inference_mode()
def grade(teacher: Speaker, messages: Messages, reply: str) -> float | None:
    """Mean NLL per token (nats) of `reply` under `teacher`, given the conversation in the
    teacher's own template and tokens; None for an empty reply."""
    prompt = render(teacher.tokenizer, messages)
    ids = render(teacher.tokenizer, messages, reply)
    if len(ids) <= len(prompt):
        return None
    x = torch.tensor([ids], device=teacher.model.device)
    logits = teacher.model(input_ids=x).logits[0, len(prompt) - 1: -1, : len(teacher.tokenizer)].float()
    return float(torch.nn.functional.cross_entropy(logits, x[0, len(prompt):]))


def read_prompts(path: Path) -> list[Messages]:
    """A text file (one prompt per line, blank lines skipped) or jsonl (`messages`: a chat up to the
    turn to answer; a trailing assistant turn is dropped). UserError naming the line."""
    if not path.is_file():
        raise UserError(f"--prompts {path}: no such file")
    prompts: list[Messages] = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        if path.suffix != ".jsonl":
            prompts.append([{"role": "user", "content": line.strip()}])
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise UserError(f"--prompts {path} line {number}: not JSON ({exc.msg}); jsonl needs one object per line") from None
        messages = row.get("messages") if isinstance(row, dict) else None
        if not (isinstance(messages, list) and messages and all(
                isinstance(m, dict) and isinstance(m.get("content"), str) and m.get("role") for m in messages)):
            raise UserError(f"--prompts {path} line {number}: needs a `messages` list of {{role, content}} turns")
        if messages[-1]["role"] == "assistant":
            messages = messages[:-1]
        if not messages:
            raise UserError(f"--prompts {path} line {number}: no turn before the assistant's")
        prompts.append(messages)
    if not prompts:
        raise UserError(f"--prompts {path} holds no prompt; write one per line (or jsonl with `messages`)")
    return prompts


def sample(run_dir: Path, prompts: list[Messages], teachers: list[str], settings: GenerationSettings,
           prompts_file: Path) -> list[dict[str, Any]]:
    """Every prompt answered by the student and every teacher, every answer graded by every teacher:
    rows {prompt, model, answer, nll: {teacher: mean NLL per token}}, also written to
    RUN_DIR/samples.jsonl."""
    speakers = load_speakers(run_dir, True, teachers)
    graders = [s for s in speakers if s.name != "student"]
    for number, messages in enumerate(prompts, 1):
        for speaker in speakers:
            check_length(speaker, render(speaker.tokenizer, messages), settings.max_new_tokens,
                         f"--prompts {prompts_file} prompt {number}")
    rows = []
    for number, messages in enumerate(prompts):
        for m, speaker in enumerate(speakers):
            seeded = GenerationSettings(settings.max_new_tokens, settings.temperature, settings.top_p,
                                        settings.seed * 1_000_003 + number * 101 + m)
            reply = answer(speaker, messages, seeded)
            rows.append({"prompt": messages, "model": speaker.name, "answer": reply,
                         "nll": {g.name: grade(g, messages, reply) for g in graders}})
    write_text_atomic(run_dir / "samples.jsonl", "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    write_report(run_dir)  # report.json shows the first prompts' answers
    return rows


def chat(run_dir: Path, teacher: str | None, compare: bool, settings: GenerationSettings, console: Any,
         read_line: Any = input) -> None:
    """An interactive chat: the student (or `teacher`, or with `compare` the student and every teacher
    side by side). Each model keeps its own conversation. Commands: /reset, /exit, /save FILE."""
    recipe = run_recipe(run_dir)
    names = (eval_teacher_names(recipe) if compare
             else [teacher] if teacher else [])
    speakers = load_speakers(run_dir, teacher is None or compare, names)
    histories: dict[str, Messages] = {s.name: [] for s in speakers}
    console.print(f"chatting with {', '.join(s.name for s in speakers)}; /reset, /save FILE, /exit")
    turn = 0
    while True:
        try:
            line = read_line("you> ")
        except EOFError:
            return
        text = line.strip()
        if not text:
            continue
        if text == "/exit":
            return
        if text == "/reset":
            histories = {s.name: [] for s in speakers}
            console.print("(conversation reset)")
            continue
        if text.startswith("/save"):
            target = Path(text[len("/save"):].strip() or "chat.json")
            target.write_text(json.dumps(histories, indent=2, ensure_ascii=False), encoding="utf-8")
            console.print(f"(saved to {target})")
            continue
        panels = []
        for m, speaker in enumerate(speakers):
            messages = histories[speaker.name] + [{"role": "user", "content": text}]
            try:
                check_length(speaker, render(speaker.tokenizer, messages), settings.max_new_tokens, "chat")
            except UserError as exc:
                console.print(f"[red]error:[/] {escape(exc.problems[0])}; /reset starts a new conversation")
                continue
            seeded = GenerationSettings(settings.max_new_tokens, settings.temperature, settings.top_p,
                                        settings.seed * 1_000_003 + turn * 101 + m)
            if len(speakers) == 1:  # one model: its tokens stream as they come
                console.print(f"{speaker.name}> ", end="")
                reply = answer(speaker, messages, seeded, TextStreamer(speaker.tokenizer, skip_prompt=True,
                                                                       skip_special_tokens=True))
            else:
                reply = answer(speaker, messages, seeded)
                panels.append(Panel(escape(reply.strip()) or "(empty)", title=speaker.name, expand=True))
            histories[speaker.name] = messages + [{"role": "assistant", "content": reply}]
        if panels and console.width >= 40 * len(panels):  # side by side, equal widths
            grid = Table.grid(expand=True, padding=(0, 1))
            for _ in panels:
                grid.add_column(ratio=1)
            grid.add_row(*panels)
            console.print(grid)
        else:  # stacked on a narrow terminal
            for panel in panels:
                console.print(panel)
        turn += 1
