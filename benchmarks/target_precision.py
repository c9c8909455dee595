"""How close the shared target step lands to each requested target on the zoo models.

    .venv/bin/python benchmarks/target_precision.py

For every zoo model: FLOPs at 1/3 and 1/2, params at 1/2, FLOPs 1/3 with --round-to 8, from
uniform widths and from random channel scores; the table gives achieved / target (must be in
[0.99, 1]) and the time of the step.
"""

from __future__ import annotations

import sys
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

import graphsearch as gs  # noqa: E402
from graphsearch import zoo  # noqa: E402
from graphsearch.target import land_on_target, parse_constraint, scores_from_widths  # noqa: E402

CASES = [("flops", "0.3333", 1), ("flops", "0.5", 1), ("params", "0.5", 1), ("flops", "0.3333", 8)]


def main() -> None:
    warnings.simplefilter("ignore")
    head = " | ".join(f"{m} {t} r{r}" for m, t, r in CASES)
    print(f"| model | scores | {head} | worst | step time (ms, mean) |")
    print("|---|---|" + "---|" * len(CASES) + "---|---|")
    rng = np.random.default_rng(0)
    for name in zoo.MODELS:
        g = gs.analyze(zoo.build(name), zoo.example_inputs(name))
        base = g.baseline
        for kind in ("uniform", "random"):
            cells, worst, times = [], 1.0, []
            for metric, text, r in CASES:
                c = parse_constraint(metric, text, getattr(base, metric))
                scores = scores_from_widths(g, {}) if kind == "uniform" else \
                    {grp.id: rng.random(grp.size) for grp in g.prunable_groups}
                t0 = time.perf_counter()
                plan = land_on_target(g, scores, [c], r)
                times.append(time.perf_counter() - t0)
                ratio = getattr(g.cost(plan.keep), metric) / c.limit
                worst = min(worst, ratio)
                cells.append(f"{ratio:.4f}")
            print(f"| {name} | {kind} | {' | '.join(cells)} | {worst:.4f} | "
                  f"{1e3 * np.mean(times):.0f} |", flush=True)


if __name__ == "__main__":
    main()
