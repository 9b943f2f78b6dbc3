"""Build report.json from the files a run directory holds.

A run directory written by the engine holds recipe.yaml, run.json, metrics.jsonl, stats.json,
student/ and, when an evaluation ran, eval.json. A crashed or still-running run may hold only
some of them; the report is built from what is there and lists the rest in `missing`.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ValidationError

from merge_distill.errors import UserError
from merge_distill.report.schema import (
    Curves,
    Evaluation,
    OnPolicy,
    OnPolicySamples,
    Report,
    Routing,
    RunFacts,
    SampleRow,
)

REPORT_FILE = "report.json"
# Files the engine always writes; any absent one makes the run incomplete. eval.json is optional.
EXPECTED = ("recipe.yaml", "run.json", "metrics.jsonl", "stats.json", "student/")
RUN_MARKERS = ("run.json", "metrics.jsonl", "stats.json", "recipe.yaml", REPORT_FILE)
ON_POLICY_SAMPLES = "onpolicy_samples.json"  # written by engine.record_samples
CURVE_KEYS = ("loss", "divergence", "ce", "lr", "tokens_per_s")
NOT_A_RUN_HINT = "pass the directory that `merge-distill run` wrote (it holds run.json and metrics.jsonl)"


def _validation_problems(path: Path, err: ValidationError) -> list[str]:
    """One line per pydantic error: file, key path, what is wrong, what was given."""
    lines = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"]) or "(top level)"
        given = repr(e.get("input"))
        given = given if len(given) <= 60 else given[:57] + "..."
        lines.append(f"{path}: key `{loc}`: {e['msg']} (given {given}); fix or remove the file")
    return lines


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise UserError(
            f"{path}: not valid JSON (line {e.lineno}, column {e.colno}: {e.msg}); "
            "the file is damaged: restore it or delete it and rerun the step that writes it"
        ) from None
    except OSError as e:
        raise UserError(f"{path}: cannot be read ({e.strerror}); check its permissions") from None


def _parse(model: type[BaseModel], path: Path, data: Any, warnings: list[str]) -> Any:
    """Validate `data` against `model`, dropping (and warning about) unknown top-level keys.

    Unknown keys are tolerated so that a newer engine adding a field to run.json does not stop
    an older report from being drawn; the report's own schema stays strict."""
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected a JSON object, found {type(data).__name__}; the file is damaged")
    known = {k: v for k, v in data.items() if k in model.model_fields}
    unknown = sorted(set(data) - set(known))
    if unknown:
        warnings.append(f"{path.name}: unknown keys ignored: {', '.join(unknown)}")
    try:
        return model.model_validate(known)
    except ValidationError as err:
        raise UserError(_validation_problems(path, err)) from None


def read_metrics(path: Path, warnings: list[str]) -> list[dict[str, Any]]:
    """metrics.jsonl -> list of per-step dicts. An unparsable *last* line (a crash mid-write,
    or a run still writing) is ignored with a warning; an unparsable earlier line is an error."""
    lines = path.read_text(encoding="utf-8").splitlines()
    while lines and not lines[-1].strip():
        lines.pop()
    records: list[dict[str, Any]] = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            if not isinstance(record, dict) or not isinstance(record.get("step"), int):
                raise ValueError("expected an object with an integer 'step'")
        except ValueError as e:  # json.JSONDecodeError is a ValueError
            if number == len(lines):
                warnings.append(f"metrics.jsonl: last line {number} is incomplete and was ignored")
                break
            raise UserError(
                f"{path}: line {number} is not a metrics record ({e}); only a truncated last line "
                "is tolerated: the file is damaged, restore it from a backup or delete the bad line"
            ) from None
        records.append(record)
    return records


def curves_from_metrics(records: list[dict[str, Any]], teachers: list[str]) -> Curves:
    """Turn per-step records into aligned series; a value not logged at a step becomes None."""
    names = list(teachers)
    for r in records:  # teachers only seen in the metrics (no run.json) keep first-seen order
        names += [t for t in (r.get("share") or {}) if t not in names]
    series: dict[str, list[float | None]] = {k: [] for k in CURVE_KEYS}
    share: dict[str, list[float | None]] = {t: [] for t in names}
    for r in records:
        for key in CURVE_KEYS:
            value = r.get(key)
            series[key].append(float(value) if isinstance(value, (int, float)) else None)
        step_share = r.get("share") or {}
        for t in names:
            value = step_share.get(t)
            share[t].append(float(value) if isinstance(value, (int, float)) else None)
    reverse_kl: dict[str, list[float | None]] = {}
    if any("on_policy" in r for r in records):
        for t in names:
            values = [((r.get("on_policy") or {}).get("reverse_kl") or {}).get(t) for r in records]
            reverse_kl[t] = [float(v) if isinstance(v, (int, float)) else None for v in values]
    return Curves(step=[int(r["step"]) for r in records], share=share, reverse_kl=reverse_kl, **series)


def on_policy_summary(records: list[dict[str, Any]], teachers: list[str], samples: Path,
                      warnings: list[str]) -> OnPolicy | None:
    """The run's on-policy figures: sampled tokens, their share of all target tokens, routing
    shares over the sampled tokens (each step's share weighted by its sampled tokens), and the
    fixed prompts' completions at the start and the end. None for an off-policy run."""
    steps = [r for r in records if isinstance(r.get("on_policy"), dict)]
    if not steps:
        return None
    tokens = sum(int(r["on_policy"].get("tokens") or 0) for r in steps)
    share: dict[str, float | None] = {}
    for t in teachers:
        weighted = [(r["on_policy"]["tokens"], (r["on_policy"].get("share") or {}).get(t)) for r in steps]
        weighted = [(n, v) for n, v in weighted if isinstance(v, (int, float)) and n]
        share[t] = sum(n * v for n, v in weighted) / sum(n for n, _ in weighted) if weighted else None
    completions: dict[str, Any] = {}
    if samples.exists():
        try:
            completions = OnPolicySamples.model_validate(_read_json(samples)).model_dump()
        except ValidationError:
            warnings.append(f"{samples.name} is not a samples file; its completions are not shown")
    return OnPolicy(tokens=tokens, target_tokens=sum(int(r.get("tokens") or 0) for r in steps), share=share,
                    **completions)


def is_run_dir(path: Path) -> bool:
    return path.is_dir() and any((path / m).exists() for m in RUN_MARKERS)


def _check_run_dir(run_dir: Path) -> None:
    if not run_dir.exists():
        raise UserError(f"{run_dir}: no such directory; {NOT_A_RUN_HINT}")
    if not run_dir.is_dir():
        raise UserError(f"{run_dir}: is a file, not a run directory; {NOT_A_RUN_HINT}")
    if not is_run_dir(run_dir):
        raise UserError(
            f"{run_dir}: not a run directory (none of {', '.join(RUN_MARKERS)} is there); {NOT_A_RUN_HINT}"
        )


def build_report(run_dir: Path) -> Report:
    """Read the run directory's files and assemble a Report; absent files are listed in `missing`."""
    run_dir = Path(run_dir)
    _check_run_dir(run_dir)
    warnings: list[str] = []
    missing = [name for name in EXPECTED if not (run_dir / name.rstrip("/")).exists()]

    run = None
    if (run_dir / "run.json").exists():
        run = _parse(RunFacts, run_dir / "run.json", _read_json(run_dir / "run.json"), warnings)
    routing = None
    if (run_dir / "stats.json").exists():
        routing = _parse(Routing, run_dir / "stats.json", _read_json(run_dir / "stats.json"), warnings)
    evaluation = None
    if (run_dir / "eval.json").exists():
        evaluation = _parse(Evaluation, run_dir / "eval.json", _read_json(run_dir / "eval.json"), warnings)

    teachers = run.teachers if run else routing.teachers if routing else []
    records = read_metrics(run_dir / "metrics.jsonl", warnings) if (run_dir / "metrics.jsonl").exists() else []
    curves = curves_from_metrics(records, teachers)

    complete = run is not None and run.status == "complete" and not missing
    on_policy = on_policy_summary(records, list(curves.share), run_dir / ON_POLICY_SAMPLES, warnings)
    return Report(on_policy=on_policy, 
        source_dir=str(run_dir), run=run, routing=routing, curves=curves, eval=evaluation,
        complete=complete, missing=missing, warnings=warnings, samples=read_samples(run_dir / SAMPLES_FILE, warnings),
    )


SAMPLES_FILE = "samples.jsonl"
SAMPLE_PROMPTS = 3  # prompts of samples.jsonl the report shows (every model's answer to each)


def read_samples(path: Path, warnings: list[str]) -> list[SampleRow]:
    """Every model's answers to the first SAMPLE_PROMPTS prompts of samples.jsonl ([] without it)."""
    if not path.exists():
        return []
    rows, prompts = [], []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        try:
            raw = json.loads(line)
            row = SampleRow(prompt=raw["prompt"][-1]["content"], model=raw["model"], answer=raw["answer"], nll=raw["nll"])
        except (json.JSONDecodeError, KeyError, IndexError, TypeError, ValidationError):
            warnings.append(f"{path} line {number} is not a sample row; samples after it are not shown")
            break
        if row.prompt not in prompts:
            if len(prompts) == SAMPLE_PROMPTS:
                break
            prompts.append(row.prompt)
        rows.append(row)
    return rows


def write_report(run_dir: Path) -> Path:
    """Build the report and write run_dir/report.json atomically (temp file + os.replace), so a
    reader never sees half a file even if the process dies mid-write. Returns the path."""
    run_dir = Path(run_dir)
    report = build_report(run_dir)
    target = run_dir / REPORT_FILE
    fd, tmp = tempfile.mkstemp(prefix=".report.", suffix=".json.tmp", dir=run_dir)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(report.model_dump_json(indent=2))
            f.write("\n")
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return target


def _load_report_file(path: Path) -> Report:
    try:
        return Report.model_validate_json(path.read_text(encoding="utf-8"))
    except ValidationError as err:
        problems = _validation_problems(path, err)
        problems.append(f"{path}: delete it and run `merge-distill report` on its directory to rebuild it")
        raise UserError(problems) from None


def load_report(path_or_run_dir: Path) -> Report:
    """A Report from a report.json file or a run directory.

    For a directory: report.json is loaded if present and not older than the files it was built
    from (a resumed run rewrites them); otherwise the report is built from the files."""
    path = Path(path_or_run_dir)
    if path.is_file():
        if path.suffix != ".json":
            raise UserError(f"{path}: is a file, not a run directory or report.json; {NOT_A_RUN_HINT}")
        return _load_report_file(path)
    _check_run_dir(path)
    report_path = path / REPORT_FILE
    if report_path.exists():
        sources = [path / n for n in ("run.json", "metrics.jsonl", "stats.json", "eval.json", SAMPLES_FILE)]
        newest_source = max((p.stat().st_mtime for p in sources if p.exists()), default=0.0)
        if report_path.stat().st_mtime >= newest_source:
            return _load_report_file(report_path)
    return build_report(path)
