"""docs/METHODS.md keeps an "As built" note for every search method the package registers, so
that a method added or renamed without saying where it departs from the design is caught."""

from __future__ import annotations

import re
from pathlib import Path

from graphsearch.methods import METHODS

ROOT = Path(__file__).resolve().parents[1]
BASELINES = {"uniform", "magnitude"}  # references, not searches: the target step's section


def test_every_search_method_has_an_as_built_note():
    text = (ROOT / "docs" / "METHODS.md").read_text()
    noted = set(re.findall(r"^\*\*As built\*\* \(`(\w+)\.py`\):", text, re.M))
    modules = {cls.__module__.rpartition(".")[2] for name, cls in METHODS.items()
               if name not in BASELINES}
    assert modules <= noted, f"no As built note for {sorted(modules - noted)}"
    stray = noted - modules - {"target"}
    assert not stray, f"notes for no method: {sorted(stray)}"
