"""Terminal drawing primitives for the report: sparklines, number formats, tables.

Charts and numbers are plain strings (no markup, no colour), and every highlight carries a
text marker, so the output reads the same in a colour terminal, with --no-color and when
piped into a log file.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TypeVar

from rich import box
from rich.console import Console
from rich.table import Table
from rich.text import Text

Key = TypeVar("Key")

BLOCKS = "▁▂▃▄▅▆▇█"
GAP = " "  # a stretch with no logged value
BAD = "×"  # a stretch containing NaN or inf (a diverged step)
STRONGEST = "★"  # largest routing share in a domain
BEST = "◆"  # lowest gold NLL / lowest perplexity in a domain
HIGHLIGHT = "bold green"


def _finite(x: float | None) -> bool:
    return x is not None and math.isfinite(x)


def downsample(values: Sequence[float | None], width: int) -> list[float | None]:
    """Shrink a series to at most `width` points by averaging equal-sized buckets.

    Bucket i covers values[floor(i*n/width) : floor((i+1)*n/width)], so every value lands in
    exactly one bucket. None values are skipped inside a bucket (an all-None bucket stays None);
    a non-finite value makes its bucket NaN so that a divergence is never averaged away.
    Series no longer than `width` are returned unchanged.
    """
    n = len(values)
    if width <= 0:
        return []
    if n <= width:
        return list(values)
    out: list[float | None] = []
    for i in range(width):
        bucket = [v for v in values[i * n // width:(i + 1) * n // width] if v is not None]
        if not bucket:
            out.append(None)
        elif not all(math.isfinite(v) for v in bucket):
            out.append(math.nan)
        else:
            out.append(sum(bucket) / len(bucket))
    return out


def sparkline(values: Sequence[float | None], width: int, lo: float | None = None, hi: float | None = None) -> str:
    """A one-line chart of `values` at most `width` characters wide, with ▁▂▃▄▅▆▇█.

    The series is downsampled to `width`, then each point is mapped linearly from [lo, hi]
    (default: the finite min and max of the downsampled series) onto the 8 block heights.
    A flat series draws mid-height blocks; None draws a gap and NaN/inf draws ×.
    """
    points = downsample(values, width)
    finite = [v for v in points if _finite(v)]
    if not finite:
        return "".join(GAP if v is None else BAD for v in points)
    lo = min(finite) if lo is None else lo
    hi = max(finite) if hi is None else hi
    chars = []
    for v in points:
        if v is None:
            chars.append(GAP)
        elif not math.isfinite(v):
            chars.append(BAD)
        elif hi - lo <= 1e-12 * max(1.0, abs(hi)):
            chars.append(BLOCKS[len(BLOCKS) // 2 - 1])
        else:
            # round((v - lo) / (hi - lo) * 7) picks one of the 8 levels; clamp for v outside [lo, hi].
            level = round((v - lo) / (hi - lo) * (len(BLOCKS) - 1))
            chars.append(BLOCKS[min(max(level, 0), len(BLOCKS) - 1)])
    return "".join(chars)


def first_last_min(values: Sequence[float | None]) -> tuple[float | None, float | None, float | None]:
    """First and last logged values and the finite minimum (None if nothing was logged)."""
    logged = [v for v in values if v is not None]
    finite = [v for v in logged if math.isfinite(v)]
    return (logged[0] if logged else None, logged[-1] if logged else None, min(finite) if finite else None)


def tail_mean(values: Sequence[float | None], k: int = 10) -> float | None:
    """Mean of the last k logged values: a final figure less noisy than the last step alone."""
    logged = [v for v in values if v is not None][-k:]
    return sum(logged) / len(logged) if logged else None


def fmt_num(x: float | None, digits: int = 4) -> str:
    """`digits` significant figures; '—' for missing, 'nan'/'inf' spelled out."""
    if x is None:
        return "—"
    if math.isnan(x):
        return "nan"
    if math.isinf(x):
        return "inf" if x > 0 else "-inf"
    if x != 0 and (abs(x) >= 1e6 or abs(x) < 1e-3):
        return f"{x:.{max(digits - 1, 1)}e}"
    # Decimals so that `digits` significant figures show: 2.3456 -> 2.346, 123.45 -> 123.5.
    magnitude = math.floor(math.log10(abs(x))) if x != 0 else 0
    return f"{x:.{min(max(digits - 1 - magnitude, 0), 6)}f}"


def fmt_pct(x: float | None, decimals: int = 1) -> str:
    return "—" if x is None else ("nan" if not math.isfinite(x) else f"{100 * x:.{decimals}f}%")


def fmt_count(n: float | None) -> str:
    """1234 -> '1.23k', 4_500_000 -> '4.50M'."""
    if n is None:
        return "—"
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{unit}"
    return f"{n:.0f}" if float(n).is_integer() else f"{n:.1f}"


def fmt_bytes(n: int | None) -> str:
    """Binary units: 1536 -> '1.5 KiB'."""
    if n is None:
        return "—"
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} TiB"


def fmt_duration(seconds: float | None) -> str:
    """3725 -> '1h 02m 05s'; 65.2 -> '1m 05s'; 4.2 -> '4.2s'."""
    if seconds is None or not math.isfinite(seconds):
        return "—"
    if seconds < 60:
        return f"{seconds:.1f}s"
    total = int(round(seconds))
    hours, rest = divmod(total, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}h {minutes:02d}m {secs:02d}s" if hours else f"{minutes}m {secs:02d}s"


def fmt_delta(x: float | None, digits: int = 4) -> str:
    """Signed difference, '+0.0123' / '-1.20'; '—' if either side was missing."""
    if x is None:
        return "—"
    return ("+" if x > 0 else "") + fmt_num(x, digits)


# --------------------------------------------------------------------------- tables


def table(*headers: str, names: int = 1) -> Table:
    """A compact table. When the console is narrow, rich shrinks only wrappable columns, so the
    first `names` columns (names) wrap and the numbers never split; headers fold."""
    out = Table(box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False)
    for i, header in enumerate(headers):
        if i < names:
            out.add_column(Text(header, overflow="fold"), overflow="fold", min_width=6)
        else:
            out.add_column(Text(header, overflow="fold"), justify="right", no_wrap=True)
    return out


def print_matrix(console: Console, corner: str, col_header: str, value_header: str, col_labels: list[str],
                 rows: list[tuple[str, list[Text], list[Text]]], extra_headers: tuple[str, ...] = (),
                 section_after: int | None = None) -> None:
    """A row x column matrix of cells; `rows` holds (row label, extra cells, one cell per column).

    Wide layout (one column per col_label) when it fits the console; otherwise a long layout
    with one line per (row, column) pair, so that a narrow terminal or many teachers never cut
    a number. Extra cells (e.g. a domain's token count) go on the first line of their row."""
    wide = table(corner, *col_labels, *extra_headers)
    for i, (label, extras, cells) in enumerate(rows):
        wide.add_row(Text(label), *cells, *extras, end_section=(i == section_after))
    natural = console.measure(wide, options=console.options.update_width(10_000)).maximum
    if natural <= console.width:
        console.print(wide)
        return
    long = table(corner, col_header, value_header, *extra_headers, names=2)
    blank = [Text("")] * len(extra_headers)
    for label, extras, cells in rows:
        for j, (column, cell) in enumerate(zip(col_labels, cells)):
            long.add_row(Text(label if j == 0 else ""), Text(column), cell, *(extras if j == 0 else blank),
                         end_section=(j == len(cells) - 1))
    console.print(long)


def legend(console: Console, text: str) -> None:
    """A key under a table, full console width (a table caption would wrap to the table's width)."""
    console.print(Text(text, style="dim"))


def marked(text: str, on: bool, marker: str) -> Text:
    return Text(f"{marker} {text}", style=HIGHLIGHT) if on else Text(text)


def best_keys(values: dict[Key, float | None], lowest: bool) -> set[Key]:
    """Keys holding the best finite value (all of them on a tie); empty if nothing is finite."""
    finite = {k: v for k, v in values.items() if v is not None and math.isfinite(v)}
    if not finite:
        return set()
    best = (min if lowest else max)(finite.values())
    return {k for k, v in finite.items() if v == best}
