"""How close the shared target step lands to each requested target on the zoo models.

    .venv/bin/python benchmarks/target_precision.py

For every zoo model: FLOPs at 1/3 and 1/2, params at 1/2, FLOPs 1/3 with --round-to 8, FLOPs
1/3 and params 1/2 with --round-to auto (the multiple `optimize` would take, in brackets), from
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
from graphsearch.latency_model import choose_round_to  # noqa: E402
from graphsearch.optimize import fit_round_to  # noqa: E402
from graphsearch.target import land_on_target, parse_constraint, scores_from_widths  # noqa: E402

CASES = [("flops", "0.3333", 1), ("flops", "0.5", 1), ("params", "0.5", 1), ("flops", "0.3333", 8),
         ("flops", "0.3333", "auto"), ("params", "0.5", "auto")]


def main() -> None:
    warnings.simplefilter("ignore")
    auto = choose_round_to()
    print(f"--round-to auto on this machine: {auto.multiple} ({auto.reason})\n")
    head = " | ".join(f"{m} {t} " + (f"r{r}" if r != "auto" else "auto") for m, t, r in CASES)
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
                multiple = r
                if r == "auto":  # as `optimize` does (the multiple in brackets)
                    multiple, _ = fit_round_to(g, [c], auto.multiple, auto.to_dict())
                t0 = time.perf_counter()
                plan = land_on_target(g, scores, [c], multiple)
                times.append(time.perf_counter() - t0)
                ratio = getattr(g.cost(plan.keep), metric) / c.limit
                worst = min(worst, ratio)
                cells.append(f"{ratio:.4f}" + (f" ({multiple})" if r == "auto" else ""))
            print(f"| {name} | {kind} | {' | '.join(cells)} | {worst:.4f} | "
                  f"{1e3 * np.mean(times):.0f} |", flush=True)


if __name__ == "__main__":
    main()
