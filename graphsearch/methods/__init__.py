"""Search methods, one file each, behind one interface (`base.Method`)."""

from __future__ import annotations

from .base import Method, Proposal, SearchContext
from .magnitude import Magnitude
from .uniform import Uniform

METHODS: dict[str, type[Method]] = {m.name: m for m in (Uniform, Magnitude)}


def get_method(name: str) -> Method:
    from ..load import UserError

    if name not in METHODS:
        raise UserError(f"unknown method {name!r}; choose one of: {', '.join(METHODS)}")
    return METHODS[name]()


__all__ = ["METHODS", "get_method", "Method", "Proposal", "SearchContext"]
