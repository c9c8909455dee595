"""Table-1-style comparison of search methods from finished `graphsearch optimize` runs.

Each argument is an `--out` folder of a finished run (its `report.json`). The runs should
share the baseline (`--weights`, or one of them training it), the data, the target and the
fine-tuning budget; the script checks that they share the baseline figures and the target,
and prints a markdown table: FLOPs, params, top-1 before and after fine-tuning, the change
against the baseline, search time, epochs, and the onnxruntime latency at batch 1.

    python benchmarks/cifar10_table.py RUN_DIR [RUN_DIR ...]

The runs behind `benchmarks/results/cifar10_table.md` are listed there with their commands.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

# The study's Table 1 (CIFAR-10, ResNet-32, 1/3 FLOPs), METHODS.md, for reference.
STUDY = [("baseline", 144.37, 487_754, 91.6), ("Group Lasso", 46.28, 225_564, 86.7),
         ("MorphNet", 46.28, 153_179, 88.8), ("Variational Dropout", 46.05, 151_238, 84.9),
         ("Generative Synthesis", 44.66, 152_668, 91.6)]


def load(run: Path) -> dict:
    path = run / "report.json"
    if not path.exists():
        sys.exit(f"error: {path} not found: is {run} the --out folder of a finished run?")
    return {**json.loads(path.read_text()), "_run": str(run)}


def label(r: dict) -> str:
    """The method, with the settings where they differ from today's defaults."""
    from graphsearch.methods import METHODS

    defaults = METHODS[r["method"]].defaults if r["method"] in METHODS else {}
    diff = [f"{k}={v}" for k, v in (r.get("settings") or {}).items()
            if k in defaults and defaults[k] != v]
    return r["method"] + (f" ({', '.join(diff)})" if diff else "")


def pct(x) -> str:
    return "-" if x is None else f"{100 * x:.2f}"


def table(reports: list[dict]) -> str:
    base = reports[0]["baseline"]
    for r in reports[1:]:
        for k in ("flops", "params", "accuracy"):
            if abs(r["baseline"][k] - base[k]) > 1e-9 * max(1.0, abs(base[k])):
                sys.exit(f"error: the runs do not share a baseline ({k}: {base[k]} vs "
                         f"{r['baseline'][k]}, method {r['method']})")
    lines = [
        "| method | MFLOPs | FLOPs ratio | params | top-1 before fine-tune | top-1 | "
        "vs baseline | search s | search epochs | fine-tune epochs | ORT ms (batch 1) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        f"| baseline | {base['flops'] / 1e6:.2f} | 1.000 | {base['params']:,} | - | "
        f"{pct(base['accuracy'])} | - | - | - | - | {base.get('latency_ms', 0):.3f} |",
    ]
    for r in sorted(reports, key=lambda r: -r["result"]["accuracy"]):
        res, ep = r["result"], r.get("epochs", {})
        search_epochs = ep.get("search") or 0
        config = Path(r["_run"]) / ".state" / "config.json"
        if not search_epochs and r["method"] not in ("uniform", "magnitude") and config.exists():
            # runs made before report.json recorded the search budget of every method
            search_epochs = json.loads(config.read_text()).get("search_epochs", 0)
        lines.append(
            f"| {label(r)} | {res['flops'] / 1e6:.2f} | {res['flops'] / base['flops']:.3f} | "
            f"{res['params']:,} | {pct(res.get('accuracy_before_finetune'))} | "
            f"{pct(res['accuracy'])} | {100 * (res['accuracy'] - base['accuracy']):+.2f} | "
            f"{r.get('search_seconds', 0):.0f} | {search_epochs:g} | "
            f"{ep.get('finetune', '-')} | {res.get('latency_ms', 0):.3f} |")
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
