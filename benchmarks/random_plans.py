"""The property test's long form: random keep plans on the zoo and the coverage models, and
random architectures, each checked the way `tests/test_slim_property.py` checks them.

For every plan: the slim model equals the mask reference (`passes.mask.verify`), its
parameter count is `g.cost(keep).params`, and it left the original model untouched. Plans
per model in turn (one round: one plan for each model), drawn like the property test's:
per prunable group a proper random subset (most likely), all, or (removable groups only)
nothing; a plan the graph refuses (`g.check`) is drawn again. Then, with
`--architectures N`, the random-architecture property test itself with N examples
(`GRAPHSEARCH_HYPOTHESIS_EXAMPLES=N pytest tests/test_slim_property.py`).

The table is rewritten after every round, so an interrupted run leaves the count it reached.

    nice .venv/bin/python benchmarks/random_plans.py --plans 5000 --architectures 5000 \
        --out-md benchmarks/results/random_plans.md
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
# the zoo at small inputs (the plan checks run a forward of each side: 224x224 ResNet-50
# would make one plan cost seconds); the coverage models as the tests build them
ZOO = {"resnet20": 32, "resnet56": 32, "resnet50": 64, "inception_v3": 75,
       "mobilenet_v2": 32, "densenet121": 32, "shufflenet_v2": 32, "vit_small": 32,
       "vit_tiny": 32}


def models():
    from graphsearch import zoo

    sys.path.insert(0, str(ROOT / "tests"))
    import coverage_models

    out = {}
    for name, size in ZOO.items():
        x = zoo.example_inputs(name)
        out[f"zoo:{name}"] = (lambda n=name: zoo.build(n),
                              (torch.randn(1, x[0].shape[1], size, size,
                                           generator=torch.Generator().manual_seed(0)),))
    for name, (build, inputs) in coverage_models.MODELS.items():
        torch.manual_seed(0)
        out[f"coverage:{name}"] = (build, inputs())
    return out


def draw_plan(g, rng) -> dict:
    keep = {}
    for grp in g.prunable_groups:
        mode = rng.choice(["subset", "subset", "subset", "all", "empty"])
        if mode == "all" or (mode == "subset" and grp.size == 1):
            continue
        if mode == "empty":
            if grp.removable:
                keep[grp.id] = []
            continue
        n = int(rng.integers(max(1, grp.min_width), grp.size))
        keep[grp.id] = sorted(rng.choice(grp.size, n, replace=False).tolist())
    return keep


def check(g, model, keep, x) -> str:
    """'' when the plan passes, else what failed."""
    from graphsearch.passes.mask import mask, verify
    from graphsearch.passes.slim import slim

    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    s = slim(g, keep)
    v = verify(s, mask(g, keep), x)
    if not v.ok:
        return f"slim != mask: {v.message}"
    params = sum(p.numel() for p in s.parameters())
    if params != g.cost(keep).params:
        return f"params {params} != cost {g.cost(keep).params}"
    after = model.state_dict()
    if any(not torch.equal(before[k], after[k]) for k in before):
        return "slim changed the original model"
    return ""


def table(args, counts, failures, arch, started) -> str:
    load = os.getloadavg()
    total = sum(c["plans"] for c in counts.values())
    lines = ["# Random plans and random architectures: slim == mask, params == cost", "",
             f"Command: `nice .venv/bin/python benchmarks/random_plans.py "
             f"{' '.join(sys.argv[1:])}`; {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, "
             f"{(time.time() - started) / 60:.0f} min so far; load average {load[0]:.1f} / "
             f"{load[1]:.1f} / {load[2]:.1f} on {os.cpu_count()} cores (shared).", "",
             f"**Random plans: {total} checked of {args.plans} asked, "
             f"{len(failures)} mismatch(es)**, over {len(counts)} models (zoo inputs shrunk "
             "for speed: the graph, and so the plans, do not depend on the spatial size).", "",
             "| model | plans | refused by g.check, drawn again | mismatches | s per plan |",
             "|---|---:|---:|---:|---:|"]
    for name, c in counts.items():
        lines.append(f"| {name} | {c['plans']} | {c['refused']} | {c['failed']} | "
                     f"{c['seconds'] / max(c['plans'], 1):.2f} |")
    for f in failures[:20]:
        lines.append(f"\n- {f}")
    if arch:
        lines += ["", f"**Random architectures** (`GRAPHSEARCH_HYPOTHESIS_EXAMPLES="
                  f"{args.architectures} pytest tests/test_slim_property.py`): {arch}"]
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--plans", type=int, default=5000)
    ap.add_argument("--architectures", type=int, default=0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out-md", type=Path)
    ap.add_argument("--models", nargs="+", default=None,
                    help="only the models whose name contains one of these (e.g. shufflenet)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    import warnings

    from graphsearch.analysis import analyze
    from graphsearch.errors import PlanError

    warnings.simplefilter("ignore")
    rng = np.random.default_rng(args.seed)
    started = time.time()
    built = {}
    for name, (build, x) in models().items():
        if args.models and not any(m in name for m in args.models):
            continue
        model = build().eval()
        built[name] = (model, analyze(model, x), x)
    counts = {n: {"plans": 0, "refused": 0, "failed": 0, "seconds": 0.0} for n in built}
    failures: list[str] = []
    done = 0
    while done < args.plans:
        for name, (model, g, x) in built.items():
            if done >= args.plans or not g.prunable_groups:
                continue
            t0 = time.time()
            while True:
                keep = draw_plan(g, rng)
                try:
                    g.check(keep)
                    break
                except PlanError:
                    counts[name]["refused"] += 1
            try:
                why = check(g, model, keep, x)
            except Exception as exc:  # noqa: BLE001 - a crash is a mismatch too
                why = f"{type(exc).__name__}: {exc}"
            counts[name]["plans"] += 1
            counts[name]["seconds"] += time.time() - t0
            done += 1
            if why:
                counts[name]["failed"] += 1
                failures.append(f"{name}, plan {keep}: {why[:300]}")
        if args.out_md:
            args.out_md.write_text(table(args, counts, failures, "", started))
    arch = ""
    if args.architectures:
        env = {**os.environ, "GRAPHSEARCH_HYPOTHESIS_EXAMPLES": str(args.architectures),
               "OMP_NUM_THREADS": "1"}
        t0 = time.time()
        r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                            str(ROOT / "tests" / "test_slim_property.py"),
                            "-k", "slim_equals_mask", "--hypothesis-show-statistics"],
                           capture_output=True, text=True, env=env, cwd=ROOT)
        tail = [ln for ln in r.stdout.splitlines() if "passed" in ln or "failed" in ln
                or "passing examples" in ln or "failing" in ln or "invalid" in ln]
        arch = (f"{'passed' if r.returncode == 0 else 'FAILED'} in {(time.time() - t0) / 60:.0f} "
                "min; " + "; ".join(ln.strip(" -") for ln in tail[-4:]))
    text = table(args, counts, failures, arch, started)
    print(text)
    if args.out_md:
        args.out_md.write_text(text)
    return 0 if not failures and "FAILED" not in arch else 1


if __name__ == "__main__":
    sys.exit(main())
