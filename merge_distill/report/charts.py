"""Text charts and number formatting for the terminal report.

Everything here returns plain strings (no markup, no colour), so the output reads the same
in a colour terminal, with --no-color and when piped into a log file.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

BLOCKS = "▁▂▃▄▅▆▇█"
GAP = " "  # a stretch with no logged value
BAD = "×"  # a stretch containing NaN or inf (a diverged step)


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
