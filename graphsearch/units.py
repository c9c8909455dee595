"""The one number formatter of graphsearch's messages and reports, and the one reader of
the intervals its settings are bounded by."""

from __future__ import annotations

import math

__all__ = ["human", "in_interval"]


def in_interval(value: float, interval: str) -> bool:
    """Whether `value` lies in `interval`, written "[1, inf)" or "(0, 1]"."""
    lo, hi = (part.strip() for part in interval.split(","))
    low, high = float(lo[1:]), float(hi[:-1])
    return not math.isnan(value) and \
        (value >= low if lo[0] == "[" else value > low) and \
        (value <= high if hi[-1] == "]" else value < high)


def human(v: float, unit: str = "", digits: int = 3) -> str:
    """`v` with a G/M/k prefix and `digits` decimals: 40.813 M, 272.474 k, 608; a `unit` of
    "ms" (a latency) prints milliseconds as they are: 0.123 ms."""
    if unit == "ms":
        return f"{v:.{digits}f} ms"
    tail = f" {unit}" if unit else ""
    for prefix, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(v) >= scale:
            return f"{v / scale:.{digits}f} {prefix}{unit}"
    return f"{v:g}{tail}"
