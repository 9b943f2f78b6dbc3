"""report.json: building from run files, the schema round trip, atomic writes, clear errors."""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path

import pytest

from merge_distill.errors import UserError
from merge_distill.report.build import build_report, curves_from_metrics, load_report, write_report
from merge_distill.report.schema import Report, RunFacts

FIXTURES = Path(__file__).parent / "fixtures"
COMPLETE = FIXTURES / "run_complete"
CRASHED = FIXTURES / "run_crashed"


def _metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture()
def run_copy(tmp_path: Path) -> Path:
    dst = tmp_path / "run"
    shutil.copytree(COMPLETE, dst)
    return dst


def test_complete_run_builds_every_section() -> None:
    report = build_report(COMPLETE)
    assert report.complete and report.missing == [] and report.warnings == []
    run = json.loads((COMPLETE / "run.json").read_text())
    assert report.run is not None and report.run.model_dump() == run
    stats = json.loads((COMPLETE / "stats.json").read_text())
    assert report.routing is not None and report.routing.model_dump() == stats
    assert report.eval is not None and report.eval.model_dump() == json.loads((COMPLETE / "eval.json").read_text())
    records = _metrics(COMPLETE)
    assert report.curves.step == [r["step"] for r in records]
    for key in ("loss", "divergence", "ce", "lr", "tokens_per_s"):
        assert getattr(report.curves, key) == [r[key] for r in records]
    assert list(report.curves.share) == ["coder", "writer", "solver"]
    for teacher, series in report.curves.share.items():
        assert series == [r["share"][teacher] for r in records]
    assert report.teacher_names == ["coder", "writer", "solver"]


def test_json_round_trip() -> None:
    for run_dir in (COMPLETE, CRASHED, FIXTURES / "run_complete_b"):
        report = build_report(run_dir)
        assert Report.model_validate_json(report.model_dump_json()) == report


def test_nan_loss_survives_round_trip(run_copy: Path) -> None:
    lines = (run_copy / "metrics.jsonl").read_text().splitlines()
    record = json.loads(lines[3])
    record["loss"] = float("nan")
    lines[3] = json.dumps(record)  # json writes NaN, as the engine's json.dumps would
    (run_copy / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    text = build_report(run_copy).model_dump_json()
    assert "NaN" in text
    back = Report.model_validate_json(text)
    assert math.isnan(back.curves.loss[3]) and back.curves.loss[4] == json.loads(lines[4])["loss"]


def test_crashed_run_is_incomplete_and_ignores_truncated_line() -> None:
    report = build_report(CRASHED)
    assert not report.complete
    assert report.run is not None and report.run.status == "running" and report.run.finished_at is None
    assert report.missing == ["stats.json", "student/"]
    assert report.routing is None and report.eval is None
    # 7 lines, the last cut mid-record: 6 steps survive.
    assert report.curves.step == [1, 2, 3, 4, 5, 6]
    assert any("last line 7" in w for w in report.warnings)


def test_complete_status_but_missing_file_is_incomplete(run_copy: Path) -> None:
    (run_copy / "stats.json").unlink()
    report = build_report(run_copy)
    assert not report.complete and report.missing == ["stats.json"]


def test_only_run_json(tmp_path: Path) -> None:
    shutil.copy(CRASHED / "run.json", tmp_path / "run.json")
    report = build_report(tmp_path)
    assert report.missing == ["recipe.yaml", "metrics.jsonl", "stats.json", "student/"]
    assert report.curves.step == [] and report.curves.share == {"coder": [], "writer": [], "solver": []}


def test_damaged_middle_metrics_line_is_an_error(run_copy: Path) -> None:
    lines = (run_copy / "metrics.jsonl").read_text().splitlines()
    lines[2] = lines[2][:20]
    (run_copy / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.raises(UserError, match=r"metrics\.jsonl: line 3 is not a metrics record"):
        build_report(run_copy)


def test_missing_share_entry_becomes_none() -> None:
    records = [{"step": 1, "loss": 1.0, "share": {"a": 0.7, "b": 0.3}}, {"step": 2, "loss": 0.9, "share": {"a": 1.0}}]
    curves = curves_from_metrics(records, ["a", "b"])
    assert curves.share == {"a": [0.7, 1.0], "b": [0.3, None]}
    assert curves.ce == [None, None] and curves.loss == [1.0, 0.9]


def test_write_report_is_atomic_and_loadable(run_copy: Path) -> None:
    path = write_report(run_copy)
    assert path == run_copy / "report.json"
    assert sorted(p.name for p in run_copy.iterdir() if p.name.startswith(".")) == []  # no temp file left
    assert load_report(run_copy) == build_report(run_copy) == load_report(path)


def test_load_prefers_report_json_unless_stale(run_copy: Path) -> None:
    path = write_report(run_copy)
    data = json.loads(path.read_text())
    data["run"]["name"] = "from-report-json"
    path.write_text(json.dumps(data))
    later = max(f.stat().st_mtime for f in run_copy.iterdir() if f.is_file()) + 10  # newer than every input
    os.utime(path, (later, later))
    assert load_report(run_copy).run.name == "from-report-json"
    # A resumed run rewrites metrics.jsonl after report.json: the report is rebuilt from files.
    os.utime(run_copy / "metrics.jsonl", (later + 10, later + 10))
    assert load_report(run_copy).run.name == "tri-teacher"


def test_unknown_run_json_key_is_a_warning(run_copy: Path) -> None:
    data = json.loads((run_copy / "run.json").read_text())
    data["gpu_name"] = "H100"
    (run_copy / "run.json").write_text(json.dumps(data))
    report = build_report(run_copy)
    assert report.warnings == ["run.json: unknown keys ignored: gpu_name"]
    assert report.run == RunFacts.model_validate({k: v for k, v in data.items() if k != "gpu_name"})


@pytest.mark.parametrize(
    ("setup", "pattern"),
    [
        (lambda d: d / "nowhere", r"nowhere: no such directory; pass the directory"),
        (lambda d: d, r"not a run directory \(none of run.json"),
        (lambda d: (d / "notes.txt").write_text("x") and d / "notes.txt", r"notes.txt: is a file"),
    ],
)
def test_not_a_run_directory(tmp_path: Path, setup, pattern: str) -> None:
    with pytest.raises(UserError, match=pattern):
        build_report(setup(tmp_path))
    with pytest.raises(UserError, match=pattern):
        load_report(setup(tmp_path))


def test_damaged_run_json_names_file_and_key(run_copy: Path) -> None:
    (run_copy / "run.json").write_text('{"name": "x",')
    with pytest.raises(UserError, match=r"run\.json: not valid JSON \(line 1, column 14"):
        build_report(run_copy)
    data = json.loads((COMPLETE / "run.json").read_text())
    data["steps_planned"] = "many"
    data["status"] = "exploded"
    (run_copy / "run.json").write_text(json.dumps(data))
    with pytest.raises(UserError) as info:
        build_report(run_copy)
    problems = info.value.problems
    assert len(problems) == 2
    assert any("key `steps_planned`" in p and "'many'" in p for p in problems)
    assert any("key `status`" in p and "'exploded'" in p for p in problems)


def test_invalid_report_json_is_an_error(run_copy: Path) -> None:
    path = write_report(run_copy)
    data = json.loads(path.read_text())
    data["schema_version"] = 2
    path.write_text(json.dumps(data))
    with pytest.raises(UserError, match=r"key `schema_version`"):
        load_report(path)
