"""Terminal rendering: figures, markers, banner, golden text, narrow/piped consoles, comparison,
the charts helpers and the `report` command.

Regenerate the golden file after an intended change of the layout with:
    UPDATE_GOLDEN=1 .venv/bin/pytest tests/report/test_render.py
"""

from __future__ import annotations

import json
import math
import os
import re
from io import StringIO
from pathlib import Path

import pytest
from rich.console import Console

from merge_distill.errors import UserError
from merge_distill.report.build import build_report
from merge_distill.report.charts import (
    BLOCKS, downsample, fmt_bytes, fmt_count, fmt_duration, fmt_num, sparkline, tail_mean,
)
from merge_distill.report.command import report_command
from merge_distill.report.render import render_comparison, render_report
from merge_distill.report.schema import Report

FIXTURES = Path(__file__).parent / "fixtures"
COMPLETE, COMPLETE_B, CRASHED = FIXTURES / "run_complete", FIXTURES / "run_complete_b", FIXTURES / "run_crashed"
GOLDEN = FIXTURES / "golden_report.txt"


def text_of(report: Report, width: int = 100, b: Report | None = None) -> str:
    console = Console(file=StringIO(), width=width, no_color=True, force_terminal=False)
    if b is None:
        render_report(report, console)
    else:
        render_comparison(report, b, console)
    return console.file.getvalue()


def line_starting(text: str, prefix: str, after: str | None = None) -> str:
    """The first line starting with `prefix` (after the line containing `after`, if given)."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if after in line) if after else 0
    return next(line for line in lines[start:] if line.startswith(prefix))


def test_golden_report() -> None:
    text = text_of(build_report(COMPLETE), width=100)
    if os.environ.get("UPDATE_GOLDEN") == "1":
        GOLDEN.write_text(text, encoding="utf-8")
    assert text == GOLDEN.read_text(encoding="utf-8")


def test_strongest_teacher_per_domain_is_marked() -> None:
    report = build_report(COMPLETE)
    text = text_of(report)
    stats = json.loads((COMPLETE / "stats.json").read_text())
    teachers = stats["teachers"]
    for domain, d in stats["per_domain"].items():
        shares = [d["teachers"][t]["share"] for t in teachers]
        line = line_starting(text, domain + " ", after="Routing share")
        cells = re.findall(r"(★ )?(\d+\.\d)%", line)
        assert [float(v) for _, v in cells] == [round(100 * s, 1) for s in shares]
        marked = [i for i, (star, _) in enumerate(cells) if star]
        assert marked == [shares.index(max(shares))], line


def test_best_teacher_nll_and_eval_are_marked() -> None:
    text = text_of(build_report(COMPLETE))
    stats = json.loads((COMPLETE / "stats.json").read_text())
    for domain, d in stats["per_domain"].items():
        best = min(d["teachers"], key=lambda t: d["teachers"][t]["mean_nll"])
        s = d["teachers"][best]
        line = line_starting(text, domain + " ", after="Teacher quality")
        assert line.count("◆") == 1 and f"◆ {s['mean_nll']:.3f} / {s['mean_entropy']:.3f}" in line
    ev = json.loads((COMPLETE / "eval.json").read_text())
    for domain in ev["domains"]:
        best = min(ev["rows"], key=lambda r: r["ppl"][domain])
        line = line_starting(text, domain + " ", after="Evaluation")
        assert line.count("◆") == 1 and f"◆ {fmt_num(best['ppl'][domain])}" in line
    # The student minus the best teacher's perplexity on code: 4.1234 - 3.5012.
    assert line_starting(text, "code ", after="Evaluation").rstrip().endswith(f"+{4.1234 - 3.5012:.4f}")


def test_run_facts_and_curves_figures() -> None:
    text = text_of(build_report(COMPLETE))
    for expected in ("sha256 3f2a9c0d1e7b ", "40 / 40 (100%), skipped 1", "163.84k", "1m 52s",
                     "12.0 GiB per process", "runs/tri-teacher/student", "world size   2", "status       complete"):
        assert expected in text
    assert f"tokens/s     {fmt_count(163840 / 112.4)}" in text  # run mean = tokens_seen / wall time
    records = [json.loads(x) for x in (COMPLETE / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records]
    loss_line = line_starting(text, "loss ", after="Curves")
    first, last, low = loss_line.split()[-3:]
    assert (first, last, low) == (f"{losses[0]:.3f}", f"{losses[-1]:.3f}", f"{min(losses):.3f}")
    assert sparkline(losses, 40) in loss_line
    assert "INCOMPLETE" not in text


def test_crashed_run_banner() -> None:
    text = text_of(build_report(CRASHED))
    assert "INCOMPLETE RUN (status: running, missing: stats.json, student/)" in text
    assert "figures cover the 6 logged steps only" in text
    assert "stats.json is missing" in text and "not finished" in text
    assert "last line 7 is incomplete" in text
    curves = text.split("Curves over steps")[1]
    assert re.search(r"^share\s*$", curves, flags=re.M)
    for teacher in ("coder", "writer", "solver"):
        assert re.search(rf"^  {teacher}\s+[▁▂▃▄▅▆▇█]{{6}}\s+33\.3%", curves, flags=re.M), teacher


@pytest.mark.parametrize("run_dir", [COMPLETE, COMPLETE_B, CRASHED])
def test_narrow_width(run_dir: Path) -> None:
    text = text_of(build_report(run_dir), width=60)
    assert all(len(line) <= 60 for line in text.splitlines())
    for teacher in ("coder", "writer", "solver"):
        assert teacher in text


def test_many_teachers_switch_to_long_layout_without_cutting_numbers() -> None:
    report = build_report(COMPLETE)
    data = json.loads(report.model_dump_json())
    names = [f"teacher-number-{i}" for i in range(6)]
    shares = [0.05, 0.1, 0.15, 0.2, 0.22, 0.28]
    cell = {"top_share": 0.1, "mean_nll": 2.0, "mean_entropy": 3.0}
    data["run"]["teachers"] = names
    data["routing"]["teachers"] = names
    data["routing"]["overall"] = {n: {"share": s, **cell} for n, s in zip(names, shares)}
    data["routing"]["per_domain"] = {"code": {"tokens": 10, "teachers": {n: {"share": s, **cell} for n, s in zip(names, shares)}}}
    data["curves"]["share"] = {n: [s] * 40 for n, s in zip(names, shares)}
    text = text_of(Report.model_validate(data), width=60)
    assert all(len(line) <= 60 for line in text.splitlines())
    assert "teacher-number-5 " in text.split("Curves over steps")[1]  # curve labels are not cut
    block = text.split("strongest teacher in the domain")[0].rsplit("largest share", 1)[1]
    for name, share in zip(names, shares):
        assert re.search(rf"{name}\s+(★ )?{100 * share:.1f}%", block), name
    assert re.search(rf"{names[-1]}\s+★ 28.0%", block)


def test_piped_output_has_no_control_codes_and_names_are_not_markup() -> None:
    report = build_report(COMPLETE)
    data = json.loads(report.model_dump_json())
    data["run"]["name"] = "[bold]not-markup"
    console = Console(file=StringIO(), force_terminal=False, width=80)
    render_report(Report.model_validate(data), console)
    out = console.file.getvalue()
    assert "\x1b[" not in out and "[bold]not-markup" in out


def test_record_console_export() -> None:
    console = Console(record=True, width=100, no_color=True, file=StringIO())
    render_report(build_report(COMPLETE), console)
    assert console.export_text() == GOLDEN.read_text(encoding="utf-8")


def test_comparison_marks_better_run() -> None:
    a, b = build_report(COMPLETE), build_report(COMPLETE_B)
    loss_a, loss_b = tail_mean(a.curves.loss, 10), tail_mean(b.curves.loss, 10)
    assert loss_a < loss_b  # fixture: A trains to a lower loss, B is faster
    text = text_of(a, b=b)
    line = line_starting(text, "final loss")
    assert line.rstrip().endswith("◀ A") and fmt_num(loss_a) in line and f"+{fmt_num(loss_b - loss_a)}" in line
    assert line_starting(text, "tokens/s").rstrip().endswith("B ▶")
    assert line_starting(text, "peak memory").rstrip().endswith("B ▶")
    # Swapping the runs swaps the marks.
    swapped = text_of(b, b=a)
    assert line_starting(swapped, "final loss").rstrip().endswith("B ▶")
    assert line_starting(text, "code · coder").split()[-2:] == [f"{100 * (0.4501 - 0.6123):+.1f}", "pp"]
    assert line_starting(text, "prose ", after="Student perplexity").rstrip().endswith("B ▶")
    narrow = text_of(a, width=60, b=b)
    assert all(len(x) <= 60 for x in narrow.splitlines()) and "◀ A" in narrow


def test_comparison_with_crashed_run() -> None:
    text = text_of(build_report(COMPLETE), b=build_report(CRASHED))
    assert "B is an INCOMPLETE RUN (status: running" in text
    assert "stats.json missing in B" in text and "only A has eval.json" in text


# --------------------------------------------------------------------------- charts


def test_downsample_bucket_means() -> None:
    values = [float(i) for i in range(10)]
    # 10 values into 4 buckets: [0,1] [2,3,4] [5,6] [7,8,9] by floor(i*n/w).
    assert downsample(values, 4) == [0.5, 3.0, 5.5, 8.0]
    assert downsample(values, 20) == values
    assert downsample([1.0, None, None, 3.0], 2) == [1.0, 3.0]
    assert downsample([None, None, 1.0, 2.0], 2) == [None, 1.5]
    assert math.isnan(downsample([1.0, math.inf, 2.0, 2.0], 2)[0])


def test_sparkline_levels() -> None:
    assert sparkline([0, 1, 2, 3, 4, 5, 6, 7], 8) == BLOCKS
    assert sparkline(list(range(1000)), 30) == sparkline(downsample(list(range(1000)), 30), 30)
    assert len(sparkline(list(range(1000)), 30)) == 30
    assert sparkline([2.0, None, math.nan, 4.0], 10) == "▁ ×█"
    assert sparkline([3.0, 3.0], 5) == "▄▄"
    assert sparkline([], 5) == ""


def test_number_formats() -> None:
    assert fmt_num(2.34567) == "2.346" and fmt_num(123.456) == "123.5" and fmt_num(None) == "—"
    assert fmt_bytes(1536) == "1.5 KiB" and fmt_bytes(12 * 1024**3) == "12.0 GiB"
    assert fmt_count(1234) == "1.23k" and fmt_count(4_500_000) == "4.50M" and fmt_count(12) == "12"
    assert fmt_duration(3725) == "1h 02m 05s" and fmt_duration(65.2) == "1m 05s" and fmt_duration(4.25) == "4.2s"


# --------------------------------------------------------------------------- command


def test_report_command_text_and_json(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("FORCE_COLOR", "TTY_COMPATIBLE", "TTY_INTERACTIVE"):  # would make rich treat the capture as a tty
        monkeypatch.delenv(var, raising=False)
    report_command([COMPLETE], no_color=True, width=100)
    assert capsys.readouterr().out == GOLDEN.read_text(encoding="utf-8")
    report_command([COMPLETE], as_json=True)
    assert Report.model_validate_json(capsys.readouterr().out) == build_report(COMPLETE)
    report_command([COMPLETE, CRASHED], as_json=True)
    both = json.loads(capsys.readouterr().out)
    assert Report.model_validate(both["a"]) == build_report(COMPLETE)
    assert Report.model_validate(both["b"]) == build_report(CRASHED)
    report_command([COMPLETE, COMPLETE_B], no_color=True, width=80)
    assert "◀ A" in capsys.readouterr().out


def test_report_command_errors(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="got 3 run directories"):
        report_command([COMPLETE, COMPLETE_B, CRASHED])
    with pytest.raises(UserError, match="give one run directory"):
        report_command([])
    with pytest.raises(UserError, match="not a run directory"):
        report_command([tmp_path])
