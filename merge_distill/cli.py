"""The `merge-distill` command.

User errors (bad recipe, missing files, an existing run directory) print one line per problem
and exit with code 2, never a traceback.
"""

from __future__ import annotations

import json
import os
import shlex
import tempfile
import subprocess
import sys
from pathlib import Path
from typing import Optional

import click
import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table
from transformers.utils import logging as hf_logging

from merge_distill.cache.writer import verify_cache, write_cache
from merge_distill import distributed as dist_mod
from merge_distill import procstatus
from merge_distill.checkpoint import RunInterrupted
from merge_distill.distributed import accelerator_for, build_launch_command
from merge_distill.engine import run as run_engine
from merge_distill.errors import USER_ERROR_EXIT_CODE, NonFiniteError, UserError
from merge_distill.evaluate import eval_teacher_names, evaluate_run, load_saved_student
from merge_distill.losses import DIVERGENCES
from merge_distill.recipe import load_recipe, read_yaml
from merge_distill.recipe_checks import alignment_summary, preflight
from merge_distill.report.command import report_command
from merge_distill.report.render import render_eval_table
from merge_distill.routing import ROUTERS
from merge_distill.generation import GenerationSettings, read_prompts, run_recipe
from merge_distill.generation import chat as run_chat
from merge_distill.generation import sample as run_samples
from merge_distill.rundir import is_run_dir, write_json_atomic, write_text_atomic
from merge_distill.scaffold import parse_data, parse_teacher, recipe_text
from merge_distill.schema import Recipe
from merge_distill.sources import SOURCES

app = typer.Typer(add_completion=True, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Per-token multi-teacher distillation of language models.")
err_console = Console(stderr=True, highlight=False)

OVERRIDES = typer.Argument(None, help="Dotted overrides, e.g. train.steps=10 loss.temperature=2")


@app.command()
def run(
    recipe: Path = typer.Argument(..., help="The recipe YAML."),
    overrides: Optional[list[str]] = OVERRIDES,
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing run in output.dir."),
    resume: bool = typer.Option(False, "--resume", help="Continue the run in output.dir from its newest complete checkpoint."),
    no_color: bool = typer.Option(False, "--no-color", help="Plain text output."),
) -> None:
    """Train the student described by RECIPE and print its blending report."""
    if resume and overwrite:
        raise UserError("--resume and --overwrite contradict each other: --resume continues the run in output.dir, "
                        "--overwrite deletes it; pass one of them")
    loaded = load_recipe(recipe, overrides or [])
    console = Console(no_color=no_color, highlight=False)
    again = shlex.join(["merge-distill", "run", str(recipe), *(overrides or []), "--resume"])
    is_main = int(os.environ.get("RANK", "0")) == 0
    try:
        run_dir = run_engine(loaded, overwrite=overwrite, console=console, resume=resume)
    except RunInterrupted as exc:
        if is_main:
            err_console.print(escape(f"{exc}; checkpoint saved: {exc.folder}\ncontinue with: {again}"), soft_wrap=True)
        raise typer.Exit(exc.exit_code) from None
    except NonFiniteError as exc:
        if is_main:
            err_console.print(f"[red]error:[/] {escape(str(exc))}", soft_wrap=True)
            if "on_nonfinite: stop" in str(exc):
                err_console.print(escape(f"the newest checkpoint holds the state before that step; to skip such "
                                         f"steps, continue with: {again} train.on_nonfinite=skip"), soft_wrap=True)
        raise typer.Exit(1) from None
    if is_main:
        report_command([run_dir], no_color=no_color)
        console.print(f"student saved to {run_dir / 'student'}")


@app.command()
def cache(
    recipe: Path = typer.Argument(..., help="The recipe YAML (it needs a cache: section)."),
    overrides: Optional[list[str]] = OVERRIDES,
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace a cache written for other settings."),
    verify: bool = typer.Option(False, "--verify", help="Check the cache in cache.dir (complete, every shard's "
                                "checksum) instead of writing it."),
    no_color: bool = typer.Option(False, "--no-color", help="Plain text output."),
) -> None:
    """Run RECIPE's teachers once over its training data and store their top-k log-probs in
    cache.dir (resumes after an interruption); then train with cache.use=true."""
    overrides = overrides or []
    if not read_yaml(recipe).get("cache") and not any(o.startswith("cache.") for o in overrides):
        raise UserError(f"{recipe}: the recipe has no cache section; add one, e.g. cache: {{dir: cache/teachers, k: 64}}")
    # Loaded as a writer: cache.use would require the cache that is about to be written.
    loaded = load_recipe(recipe, [*overrides, "cache.use=false"])
    console = Console(no_color=no_color, highlight=False)
    if verify:
        assert loaded.cache is not None
        checked = verify_cache(Path(loaded.cache.dir))
        console.print(f"cache ok: {loaded.cache.dir} ({checked} shards, every checksum matches manifest.json)")
        return
    result = write_cache(loaded, console=console, overwrite=overwrite)
    manifest = result.root / "manifest.json"
    if int(os.environ.get("RANK", "0")) == 0:
        stored = json.loads(manifest.read_text())
        what = ("the teachers' hidden states (int8) and heads: full distributions"
                if stored["store"] == "hidden" else f"top-{stored['k']} log-probs ({stored['dtype']}) + tail")
        console.print(f"cache complete: {result.root} ({result.shards_written} shards written, {result.shards_kept} kept "
                      f"from before, {result.seconds:.1f} s); stores {what}, {stored['bytes_per_token_per_teacher']} bytes "
                      f"per token per teacher; train from it with cache.use=true (manifest: {manifest})")


@app.command()
def validate(
    recipe: Path = typer.Argument(..., help="The recipe YAML."),
    overrides: Optional[list[str]] = OVERRIDES,
    no_files: bool = typer.Option(False, "--no-files", help="Skip checks of model and data paths and tokenizers."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Check as `run --overwrite` would."),
    resume: bool = typer.Option(False, "--resume", help="Check as `run --resume` would."),
) -> None:
    """Check RECIPE (schema, cross-references, paths, tokenizers, data, output.dir, cache) as `run`
    would before its first step; report every problem at once."""
    loaded = load_recipe(recipe, overrides or [], check_files=not no_files)
    if not no_files:
        problems = preflight(loaded, overwrite=overwrite, resume=resume, world_size=int(os.environ.get("WORLD_SIZE", 1)))
        if problems:
            raise UserError(problems)
    source = next(e for e in SOURCES.values() if e.selects(loaded))
    Console(highlight=False).print(
        f"[green]ok[/]: {recipe} — {len(loaded.teachers)} teachers ({', '.join(loaded.teacher_names)}), "
        f"routing {loaded.routing.kind}, loss {loaded.loss.kind}, output {loaded.output.dir}; "
        f"teachers from the {source.name} source ({source.summary})"
    )
    if not no_files:
        for line in alignment_summary(loaded):
            Console(highlight=False).print(f"  {line}")


@app.command("eval")
def evaluate(
    target: Path = typer.Argument(..., help="A run directory, or a model directory (then give --recipe)."),
    recipe: Optional[Path] = typer.Option(None, "--recipe", help="Recipe whose data.eval and teachers to use."),
    teachers: bool = typer.Option(True, "--teachers/--no-teachers", help="Also evaluate the recipe's teachers."),
    as_json: bool = typer.Option(False, "--json", help="Print the JSON instead of a table."),
) -> None:
    """Per-domain held-out perplexity of a student (and the recipe's teachers)."""
    in_run = is_run_dir(target) and (target / "recipe.yaml").is_file()
    if recipe is None and not in_run:
        raise UserError(f"{target}: not a run directory (no recipe.yaml); give --recipe r.yaml to say what data to use")
    loaded = load_recipe(recipe or target / "recipe.yaml")
    model_dir = target / "student" if in_run else target
    if not (model_dir / "config.json").is_file():
        raise UserError(f"{model_dir}: no saved model here (config.json missing); did the run finish?")
    accelerator = accelerator_for(loaded)
    student, tokenizer = load_saved_student(loaded, accelerator, model_dir)
    result = evaluate_run(loaded, accelerator, student, tokenizer, teachers=teachers)
    if int(os.environ.get("RANK", "0")) != 0:
        return
    if in_run:
        write_json_atomic(target / "eval.json", result)
    if as_json:
        print(json.dumps(result, indent=2))
    else:
        render_eval_table(result, Console(highlight=False))


@app.command()
def launch(
    recipe: Path = typer.Argument(..., help="The recipe YAML."),
    overrides: Optional[list[str]] = OVERRIDES,
    nproc: int = typer.Option(..., "--nproc", min=1, help="Processes (GPUs) per node."),
    nnodes: int = typer.Option(1, "--nnodes", min=1, help="Number of nodes."),
    hostfile: Optional[Path] = typer.Option(None, "--hostfile", help="DeepSpeed hostfile (deepspeed launcher, several nodes)."),
    launcher: str = typer.Option("accelerate", "--launcher", help="accelerate, deepspeed or torchrun."),
    node_rank: Optional[int] = typer.Option(None, "--node-rank", help="This node's rank (default NODE_RANK / SLURM_NODEID)."),
    master_addr: Optional[str] = typer.Option(None, "--master-addr", help="First node's address (default MASTER_ADDR)."),
    master_port: Optional[int] = typer.Option(None, "--master-port", help="Rendezvous port (default 29500)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing run in output.dir (or cache)."),
    resume: bool = typer.Option(False, "--resume", help="(run) Continue the run in output.dir from its newest complete checkpoint."),
    command: str = typer.Option("run", "--command", help="What the processes run: run (train), cache (write the "
                                "teacher cache) or eval (evaluate the run in output.dir)."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print the command without running it."),
) -> None:
    """Build the launcher command for N processes (x M nodes), print it, and run it."""
    if launcher not in ("accelerate", "deepspeed", "torchrun"):
        raise UserError(f"--launcher: {launcher!r} is not one of accelerate, deepspeed, torchrun")
    if command not in ("run", "cache", "eval"):
        raise UserError(f"--command: {command!r} is not one of run, cache, eval")
    loaded = load_recipe(recipe, [*(overrides or []), *(["cache.use=false"] if command == "cache" else [])])
    if resume and command != "run":
        raise UserError(f"--resume continues a training run; it does not apply to --command {command}")
    if command == "eval":
        if overrides or overwrite:
            raise UserError("launch --command eval evaluates the run in output.dir as recorded; drop the overrides "
                            "and --overwrite")
        args = ["eval", loaded.output.dir, "--recipe", str(recipe)]
    else:
        args = [command, str(recipe), *(overrides or []), *(["--overwrite"] if overwrite else []),
                *(["--resume"] if resume else [])]
    try:
        argv = build_launch_command(args, nproc, nnodes, hostfile, launcher,  # type: ignore[arg-type]
                                    node_rank=node_rank, master_addr=master_addr, master_port=master_port)
    except ValueError as exc:
        raise UserError(f"launch: {exc}") from None
    Console(highlight=False, soft_wrap=True).print(shlex.join(argv))
    if dry_run:
        return
    with tempfile.TemporaryDirectory(prefix="merge-distill-launch-") as status:
        code = subprocess.call(argv, env={**os.environ, procstatus.STATUS_ENV: status})
        if code != 0:
            lines = procstatus.failures(Path(status), nproc if nnodes == 1 else None)
            for line in lines or [f"the launcher exited with code {code}"]:
                err_console.print(f"[red]error:[/] {escape(line)}", soft_wrap=True)
            if command == "run":
                again = shlex.join(["merge-distill", "launch", str(recipe), *(overrides or []), "--nproc", str(nproc),
                                    *(["--nnodes", str(nnodes)] if nnodes > 1 else []), "--resume"])
                err_console.print(escape(f"every checkpoint is complete or absent (each is written aside and renamed); "
                                         f"continue with: {again}"), soft_wrap=True)
    raise typer.Exit(code)


@app.command("ls")
def list_plugins() -> None:
    """List the registered routers, losses and teacher sources."""
    console = Console(highlight=False)
    for registry in (ROUTERS, DIVERGENCES):
        console.print(f"[bold]{registry.what}s[/]")
        for entry in registry.entries():
            console.print(f"  {entry.name:<12} {entry.summary}")
    console.print("[bold]teacher sources[/]")
    for source in SOURCES.values():
        console.print(f"  {source.name:<12} {source.summary} (provides {', '.join(sorted(source.provides))})")


@app.command()
def init(
    out: Path = typer.Argument(..., help="The recipe file to write, e.g. recipes/mine.yaml."),
    teacher: list[str] = typer.Option(..., "--teacher", help="NAME=PATH (a model directory or hub id); repeat for several."),
    student: str = typer.Option("from_teacher", "--student", help="PATH (a model), from_teacher or from_config."),
    data: list[str] = typer.Option(..., "--data", help="PATH[:DOMAIN] (jsonl, parquet, text file or folder, or a hub dataset); repeatable."),
    force: bool = typer.Option(False, "--force", help="Replace OUT if it exists."),
) -> None:
    """Write a commented recipe for these teachers, student and data, with defaults that fit them."""
    if out.exists() and not force:
        raise UserError(f"{out} exists; choose another file or pass --force to replace it")
    text = recipe_text(out, [parse_teacher(t) for t in teacher], student, [parse_data(d) for d in data])
    out.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out, text)
    Console(highlight=False).print(f"wrote {out}; check it with: merge-distill validate {out}")


@app.command()
def chat(
    run_dir: Path = typer.Argument(..., help="A run directory (output.dir of a finished run)."),
    teacher: Optional[str] = typer.Option(None, "--teacher", help="Chat with this teacher instead of the student."),
    compare: bool = typer.Option(False, "--compare", help="The student and every teacher answer each message, side by side."),
    max_new_tokens: int = typer.Option(256, "--max-new-tokens", min=1),
    temperature: float = typer.Option(0.0, "--temperature", min=0.0, help="0: greedy."),
    top_p: float = typer.Option(1.0, "--top-p", min=0.0, max=1.0),
    seed: int = typer.Option(0, "--seed"),
) -> None:
    """Chat in the terminal with the run's student (its chat template; tokens stream as they come).
    In the chat: /reset, /save FILE, /exit."""
    run_chat(run_dir, teacher, compare, GenerationSettings(max_new_tokens, temperature, top_p, seed),
             Console(highlight=False))


@app.command()
def sample(
    run_dir: Path = typer.Argument(..., help="A run directory (output.dir of a finished run)."),
    prompts: Path = typer.Option(..., "--prompts", help="A text file (one prompt per line) or jsonl with `messages`."),
    teacher: Optional[list[str]] = typer.Option(None, "--teacher", help="Teachers to answer and grade (default: all but a `self` one)."),
    max_new_tokens: int = typer.Option(128, "--max-new-tokens", min=1),
    temperature: float = typer.Option(0.0, "--temperature", min=0.0, help="0: greedy."),
    top_p: float = typer.Option(1.0, "--top-p", min=0.0, max=1.0),
    seed: int = typer.Option(0, "--seed"),
) -> None:
    """Answer every prompt with the student and its teachers; grade every answer by every teacher
    (mean NLL per token); write RUN_DIR/samples.jsonl and print a table."""
    recipe = run_recipe(run_dir)
    names = teacher if teacher else eval_teacher_names(recipe)
    rows = run_samples(run_dir, read_prompts(prompts), names, GenerationSettings(max_new_tokens, temperature, top_p, seed),
                       prompts)
    table = Table(title=f"{len(rows)} answers, graded by the teachers (mean NLL per token, nats; lower: the teacher "
                        "finds the answer more likely)", show_lines=True)
    table.add_column("prompt", max_width=30)
    table.add_column("model", no_wrap=True)
    table.add_column("answer", max_width=60)
    for name in names:
        table.add_column(f"NLL {name}", justify="right")
    for row in rows:
        prompt = row["prompt"][-1]["content"]
        table.add_row(escape(prompt), row["model"], escape(row["answer"].strip()),
                      *["—" if row["nll"][n] is None else f"{row['nll'][n]:.3f}" for n in names])
    Console(highlight=False).print(table)
    Console(highlight=False).print(f"wrote {run_dir / 'samples.jsonl'}")


@app.command()
def schema(
    out: Optional[Path] = typer.Option(None, "--out", help="Write the schema to this file instead of printing it."),
) -> None:
    """Print the recipe's JSON Schema (every key with its description), for editors that complete and
    check YAML keys."""
    document = {"$schema": "https://json-schema.org/draft/2020-12/schema", **Recipe.model_json_schema()}
    document["title"] = "merge_distill recipe"
    text = json.dumps(document, indent=2) + "\n"
    if out is None:
        sys.stdout.write(text)
        return
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text, encoding="utf-8")
    Console(highlight=False).print(f"wrote {out}")


@app.command()
def report(
    run_dirs: list[Path] = typer.Argument(..., help="One run directory, or two to compare."),
    as_json: bool = typer.Option(False, "--json", help="Print report.json instead of tables."),
    no_color: bool = typer.Option(False, "--no-color", help="Plain text output."),
    width: Optional[int] = typer.Option(None, "--width", help="Render at this many columns."),
) -> None:
    """Render the blending report of a run (or compare two runs)."""
    report_command(run_dirs, as_json=as_json, no_color=no_color, width=width)


def quiet_libraries() -> None:
    """Library progress bars and advisory warnings would drown the run's own display."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def main() -> None:
    quiet_libraries()
    with procstatus.reported():  # for `merge-distill launch`: which processes ended, and how
        _main()


def _main() -> None:
    try:
        code = app(standalone_mode=False)  # click returns (not raises) a command's typer.Exit code here
        if isinstance(code, int) and code:
            sys.exit(code)
    except UserError as exc:
        for problem in exc.problems:  # escaped: `teachers[code]` is a key, not a rich style tag
            err_console.print(f"[red]error:[/] {escape(problem)}", soft_wrap=True)
        sys.exit(USER_ERROR_EXIT_CODE)
    except typer.Exit as exc:
        sys.exit(exc.exit_code)
    except (typer.Abort, KeyboardInterrupt):
        err_console.print("interrupted")
        sys.exit(130)
    except Exception as exc:  # click usage errors carry their own exit code (2)
        if isinstance(exc, click.ClickException):
            exc.show()
            sys.exit(exc.exit_code)
        if isinstance(exc, NonFiniteError):
            err_console.print(f"[red]error:[/] {escape(str(exc))}", soft_wrap=True)
            sys.exit(1)
        if dist_mod.is_collective_failure(exc):
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            err_console.print(f"[red]error:[/] process rank {os.environ.get('RANK', '0')}: a collective with the other "
                              f"processes failed ({escape(first[:300])}); another process stopped, hangs or was lost "
                              "(distributed.collective_timeout_s bounds the wait); the launcher's report names it",
                              soft_wrap=True)
            sys.exit(1)
        raise


if __name__ == "__main__":
    main()
