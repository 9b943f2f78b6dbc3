"""`merge-distill report RUN_DIR [RUN_DIR_B]`: show one run's report, or compare two runs.

The CLI (cli.py) parses the arguments and calls `report_command`; UserError is printed there
without a traceback. The report is loaded from run_dir/report.json when it is up to date and
built from the run files otherwise; this command never writes into the run directory.
"""

from __future__ import annotations

import sys
from pathlib import Path

from rich.console import Console

from merge_distill.errors import UserError
from merge_distill.report.build import load_report
from merge_distill.report.render import render_comparison, render_report


def report_command(run_dirs: list[Path], as_json: bool = False, no_color: bool = False, width: int | None = None) -> None:
    """Render one run (or print its report.json with as_json), or compare two runs side by side.

    With as_json and two runs, prints {"a": report_a, "b": report_b}. The JSON goes to stdout
    unstyled so it can be piped into jq. Raises UserError for no run, more than two runs, a
    bad width, or a path that is not a run directory."""
    if not run_dirs:
        raise UserError("report: give one run directory to show, or two to compare")
    if len(run_dirs) > 2:
        raise UserError(
            f"report: got {len(run_dirs)} run directories ({', '.join(str(p) for p in run_dirs)}); "
            "give one to show a run or two to compare them"
        )
    if width is not None and width < 40:
        raise UserError(f"report --width is {width}; use 40 columns or more (or leave it out to use the terminal's)")
    reports = [load_report(Path(p)) for p in run_dirs]
    if as_json:
        if len(reports) == 1:
            text = reports[0].model_dump_json(indent=2)
        else:
            # Each report is already valid JSON; splice them rather than re-encoding via dicts,
            # so NaN/inf stay written the same way as in report.json.
            a, b = (r.model_dump_json(indent=2).replace("\n", "\n  ") for r in reports)
            text = '{\n  "a": ' + a + ',\n  "b": ' + b + "\n}"
        sys.stdout.write(text + "\n")
        return
    console = Console(no_color=no_color, width=width, highlight=False)
    if len(reports) == 1:
        render_report(reports[0], console)
    else:
        render_comparison(reports[0], reports[1], console)
