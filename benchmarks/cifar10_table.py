"""Table-1-style comparison of search methods over several seeds, from finished
`graphsearch optimize` runs, on the test split (data no decision saw).

Each argument is an `--out` folder of a finished run (its `report.json`). Runs of one method
with different `--seed` are grouped: the table gives the mean and the spread (min-max) of the
test top-1 over seeds, the FLOPs and params, and two measures of how far each method's plan is
from the baselines it could degrade into, per seed then averaged:

- overlap with magnitude: of the channels the method keeps in the prunable groups, the share
  that `magnitude` (same seed) also keeps (1.0: the same channels);
- width distance from uniform: mean over prunable groups of |w_method - w_uniform| / C_g
  (0.0: the same widths as `uniform`).

The runs must share the baseline figures and the target (checked). A difference between two
methods is called "beyond the spread" when their min-max ranges over seeds do not overlap.

    python benchmarks/cifar10_table.py RUN_DIR [RUN_DIR ...] [--markdown-out FILE]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections import defaultdict
from pathlib import Path

# The study's Table 1 (CIFAR-10, ResNet-32, 1/3 FLOPs), METHODS.md, for reference.
STUDY = [("baseline", 144.37, 487_754, 91.6), ("Group Lasso", 46.28, 225_564, 86.7),
         ("MorphNet", 46.28, 153_179, 88.8), ("Variational Dropout", 46.05, 151_238, 84.9),
         ("Generative Synthesis", 44.66, 152_668, 91.6)]


def load(run: Path) -> dict:
    path = run / "report.json"
    if not path.exists():
        sys.exit(f"error: {path} not found: is {run} the --out folder of a finished run?")
    r = json.loads(path.read_text())
    config = run / ".state" / "config.json"
    r["_seed"] = json.loads(config.read_text()).get("seed", 0) if config.exists() else 0
    r["_run"] = str(run)
    for part in ("baseline", "result"):
        if "test_accuracy" not in r[part]:
            sys.exit(f"error: {path} has no test accuracy (run made before the test split "
                     "existed): re-run it")
    return r


def label(r: dict) -> str:
    """The method, with the settings where they differ from today's defaults."""
    from graphsearch.methods import METHODS

    defaults = METHODS[r["method"]].defaults if r["method"] in METHODS else {}
    diff = [f"{k}={v}" for k, v in (r.get("settings") or {}).items()
            if k in defaults and defaults[k] != v]
    return r["method"] + (f" ({', '.join(diff)})" if diff else "")


def kept_sets(r: dict) -> dict[str, set]:
    sizes = {gid: w["size"] for gid, w in r["widths"].items()}
    keep = r.get("keep", {})
    return {gid: set(keep[gid]) if gid in keep else set(range(sizes[gid])) for gid in sizes}


def overlap(r: dict, ref: dict) -> float:
    a, b = kept_sets(r), kept_sets(ref)
    kept = sum(len(a[g]) for g in a if r["widths"][g]["width"] != r["widths"][g]["size"]
               or ref["widths"][g]["width"] != ref["widths"][g]["size"])
    common = sum(len(a[g] & b[g]) for g in a if r["widths"][g]["width"] != r["widths"][g]["size"]
                 or ref["widths"][g]["width"] != ref["widths"][g]["size"])
    return common / kept if kept else 1.0


def width_distance(r: dict, ref: dict) -> float:
    ds = [abs(r["widths"][g]["width"] - ref["widths"][g]["width"]) / w["size"]
          for g, w in r["widths"].items()]
    return sum(ds) / len(ds) if ds else 0.0


def check_shared(reports: list[dict]) -> None:
    base = reports[0]
    for r in reports[1:]:
        for k in ("flops", "params", "test_accuracy"):
            if abs(r["baseline"][k] - base["baseline"][k]) > 1e-9 * max(1.0, abs(base["baseline"][k])):
                sys.exit(f"error: the runs do not share a baseline ({k}: {base['baseline'][k]} vs "
                         f"{r['baseline'][k]}, {r['_run']})")
        if [t["limit"] for t in r["targets"]] != [t["limit"] for t in base["targets"]]:
            sys.exit(f"error: {r['_run']} has other targets than {base['_run']}")


def summarise(reports: list[dict]) -> list[dict]:
    by_method: dict[str, list[dict]] = defaultdict(list)
    for r in reports:
        by_method[label(r)].append(r)
    by_seed = {(r["method"], r["_seed"]): r for r in reports}
    rows = []
    for name, runs in by_method.items():
        accs = [100 * r["result"]["test_accuracy"] for r in runs]
        ov = [overlap(r, by_seed[("magnitude", r["_seed"])]) for r in runs
              if ("magnitude", r["_seed"]) in by_seed]
        wd = [width_distance(r, by_seed[("uniform", r["_seed"])]) for r in runs
              if ("uniform", r["_seed"]) in by_seed]
        rows.append({
            "method": name, "seeds": sorted(r["_seed"] for r in runs), "accs": accs,
            "mean": statistics.mean(accs), "lo": min(accs), "hi": max(accs),
            "sd": statistics.stdev(accs) if len(accs) > 1 else 0.0,
            "val": statistics.mean(100 * r["result"]["val_accuracy"] for r in runs),
            "mflops": statistics.mean(r["result"]["flops"] for r in runs) / 1e6,
            "ratio": statistics.mean(r["ratios"]["flops"] for r in runs),
            "params": statistics.mean(r["result"]["params"] for r in runs),
            "overlap": statistics.mean(ov) if ov else None,
            "wdist": statistics.mean(wd) if wd else None,
            "search_s": statistics.mean((r.get("search_seconds") or 0) for r in runs),
            "search_epochs": runs[0].get("epochs", {}).get("search", 0),
            "finetune_epochs": runs[0].get("epochs", {}).get("finetune", "-"),
        })
    return sorted(rows, key=lambda x: -x["mean"])


def table(reports: list[dict]) -> str:
    check_shared(reports)
    base = reports[0]["baseline"]
    rows = summarise(reports)
    f = lambda x, fmt: "-" if x is None else format(x, fmt)  # noqa: E731
    lines = [
        "| method | seeds | test top-1 mean | min-max | sd | val top-1 mean | MFLOPs | FLOPs "
        "ratio | params | overlap with magnitude | width distance from uniform | search s | "
        "search epochs | fine-tune epochs |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        f"| baseline | - | {100 * base['test_accuracy']:.2f} | - | - | "
        f"{100 * base['val_accuracy']:.2f} | {base['flops'] / 1e6:.2f} | 1.000 | "
        f"{base['params']:,} | - | - | - | - | - |",
    ]
    for r in rows:
        lines.append(
            f"| {r['method']} | {','.join(map(str, r['seeds']))} | {r['mean']:.2f} | "
            f"{r['lo']:.2f}-{r['hi']:.2f} | {r['sd']:.2f} | {r['val']:.2f} | {r['mflops']:.2f} | "
            f"{r['ratio']:.3f} | {r['params']:,.0f} | {f(r['overlap'], '.3f')} | "
            f"{f(r['wdist'], '.3f')} | {r['search_s']:.0f} | {r['search_epochs']:g} | "
            f"{r['finetune_epochs']} |")
    lines += ["", "Differences beyond the seed spread (min-max ranges do not overlap):", ""]
    beyond = [f"- {a['method']} ({a['mean']:.2f}) > {b['method']} ({b['mean']:.2f})"
              for i, a in enumerate(rows) for b in rows[i + 1:]
              if a["lo"] > b["hi"] and len(a["seeds"]) > 1 and len(b["seeds"]) > 1]
    single = [r["method"] for r in rows if len(r["seeds"]) < 2]
    lines += beyond or ["- none"]
    if single:
        lines += [f"- not judged (one seed, no spread): {', '.join(single)}"]
    return "\n".join(lines)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+", type=Path)
    args = ap.parse_args(argv)
    reports = [load(r) for r in args.runs]
    print(table(reports))
    print()
    print("The study (ResNet-32, full CIFAR-10 training, METHODS.md):")
    print()
    print("| method | MFLOPs | params | top-1 |\n|---|---:|---:|---:|")
    for name, mf, p, acc in STUDY:
        print(f"| {name} | {mf} | {p:,} | {acc} |")


if __name__ == "__main__":
    main()
