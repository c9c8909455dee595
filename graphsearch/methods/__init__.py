"""Search methods, one file each, behind one interface (`base.Method`)."""

from __future__ import annotations

from ..errors import UserError
from .autoshrink import AutoShrink
from .base import Method, Proposal, SearchContext
from .esnac import ESNAC
from .gensynth import GenerativeSynthesis
from .group_lasso import GroupLasso
from .magnitude import Magnitude
from .morphnet import MorphNet
from .submodular import Submodular
from .uniform import Uniform
from .vardrop import VariationalDropout

METHODS: dict[str, type[Method]] = {
    m.name: m for m in (Uniform, Magnitude, GroupLasso, VariationalDropout, MorphNet,
                        GenerativeSynthesis, AutoShrink, Submodular, ESNAC)
}


def get_method(name: str) -> Method:

    if name not in METHODS:
        raise UserError(f"unknown method {name!r}; choose one of: {', '.join(METHODS)}")
    return METHODS[name]()


__all__ = ["METHODS", "get_method", "Method", "Proposal", "SearchContext"]
