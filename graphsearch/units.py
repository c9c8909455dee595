"""The one number formatter of graphsearch's messages and reports."""

from __future__ import annotations

__all__ = ["human"]


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
