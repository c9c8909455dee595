"""A method's settings are refused up front when out of their bounds or choices
(`Method.check_settings`), by `optimize` before the baseline is trained and by the search."""

import math
import re
from dataclasses import replace

import pytest

from graphsearch.load import UserError
from graphsearch.methods import METHODS
from graphsearch.optimize import OptimizeConfig
from graphsearch.units import in_interval

BOUNDED = [(name, key) for name, m in sorted(METHODS.items()) for key in sorted(m.bounds)]
CHOSEN = [(name, key) for name, m in sorted(METHODS.items()) for key in sorted(m.choices)]


@pytest.mark.parametrize("value,interval,inside", [
    (1, "[1, inf)", True), (0, "[1, inf)", False), (0.0, "(0, 1]", False),
    (1.0, "(0, 1]", True), (1.5, "(0, 1]", False), (1e-9, "(0, 1]", True),
    (0.999, "[0, 1)", True), (1.0, "[0, 1)", False), (math.nan, "[0, inf)", False),
    (math.inf, "[0, inf)", False), (-math.inf, "(-inf, 0]", False),
])
def test_in_interval(value, interval, inside):
    assert in_interval(value, interval) is inside


def _outside(interval: str, whole: bool) -> list[float]:
    """Values just outside `interval` (a whole number where the setting takes one)."""
    lo, hi = (p.strip() for p in interval.split(","))
    low, high = float(lo[1:]), float(hi[:-1])
    step = 1 if whole else 1e-6
    out = []
    if math.isfinite(low):
        out.append(low - step if lo[0] == "[" else low)
    if math.isfinite(high):
        out.append(high + step if hi[-1] == "]" else high)
    return [int(v) if whole else v for v in out]


@pytest.mark.parametrize("name,key", BOUNDED)
def test_a_number_outside_its_bounds_is_refused_and_the_default_is_inside(name, key):
    """The bug: `--set k=0` (autoshrink), `cycles=0` (gensynth) and the like were refused only
    when the search began, after the baseline's training, and MorphNet ran `repeats=0` as 1
    without a word."""
    method = METHODS[name]()
    interval = method.bounds[key]
    default = method.defaults[key]
    whole = isinstance(default, int) and not isinstance(default, bool)
    if default is not None:
        assert in_interval(float(default), interval), (name, key, default, interval)
        method.check_settings({key: default})
    outside = _outside(interval, whole)
    assert outside, interval
    kind = "a whole number" if whole else "a number"
    for value in outside:
        with pytest.raises(UserError, match=re.escape(
                f"--set {key}={value!r}: {name}'s {key} takes {kind} in {interval}")):
            method.check_settings({key: value})


@pytest.mark.parametrize("name,key", CHOSEN)
def test_a_text_setting_takes_one_of_its_choices(name, key):
    method = METHODS[name]()
    method.check_settings({key: method.defaults[key]})
    for choice in method.choices[key]:
        method.check_settings({key: choice})
    with pytest.raises(UserError, match=f"--set {key}='bogus': {name}'s {key} takes one of "):
        method.check_settings({key: "bogus"})


def test_the_bounded_settings_are_those_a_search_cannot_run_without():
    """What each method declares (a search checked these itself, after the baseline)."""
    for m in METHODS.values():
        assert set(m.bounds) | set(m.choices) <= set(m.defaults), m.name
    assert {"k", "block"} <= set(METHODS["autoshrink"].bounds)
    assert {"init", "steps", "kernels", "actions"} <= set(METHODS["esnac"].bounds)
    assert {"cycles", "children"} <= set(METHODS["gensynth"].bounds)
    assert "increments" in METHODS["submodular"].bounds
    assert {"repeats", "shrink_to", "cost_weight"} <= set(METHODS["morphnet"].bounds)
    for name in ("magnitude", "group-lasso", "vardrop", "morphnet"):
        assert METHODS[name].bounds["max_ratio"] == "(0, 1]"
    assert {"blocks", "inherit", "optimizer"} <= set(METHODS["autoshrink"].choices)
    assert {"direction", "optimizer"} <= set(METHODS["submodular"].choices)
    assert {"init", "netscore_costs"} <= set(METHODS["gensynth"].choices)
    assert {"normalise", "schedule"} <= set(METHODS["magnitude"].choices)


def test_the_run_options_defaults_lie_in_their_bounds_and_outside_values_are_refused():
    config = OptimizeConfig(model="zoo:resnet20")
    config.check()
    for name, interval in OptimizeConfig.BOUNDS.items():
        whole = name in OptimizeConfig.WHOLE
        for value in _outside(interval, whole):
            with pytest.raises(UserError, match=re.escape(f"--{name.replace('_', '-')} ")):
                replace(config, **{name: value}).check()
    with pytest.raises(UserError, match=re.escape("--batch-size 2.5: give a whole number")):
        replace(config, batch_size=2.5).check()
