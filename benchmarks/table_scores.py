"""Do the cheap candidate scores rank the table's plans as their full fine-tune did?

    python benchmarks/table_scores.py --weights benchmarks/weights/resnet20_cifar10_116ep.pt \
        --train /work/runs/cifar/train40k --val /work/runs/cifar/val5k \
        --truth benchmarks/table_truth.json --out /work/runs/tscores [--only 0 3 5]
    python benchmarks/table_scores.py --truth benchmarks/table_truth.json \
        --out /work/runs/tscores --table

`rank_correlation.py` measures the scores against a short fine-tune of random and magnitude
plans. Here the truth is the table's: every plan of `benchmarks/table_truth.json` was
fine-tuned with the table's full budget (5 distilled epochs on 40,000 images, one to three
seeds; `results/cifar10_table.md`), and its mean validation top-1 is written there. Each plan
is rebuilt by `peer.py`'s `plan_module` (the method's search, search seed 0 unless the entry
says otherwise: the module the pipeline fine-tunes, with the weights it starts from), checked
against the table's parameter count (a plan the current code no longer makes is left out, and
listed), and scored by each cheap score of `rank_correlation.cheap_scores` on one thread: the
score on the whole validation folder and on the evaluator's fixed 1,000 of it. Kendall's tau
over the plans, for every score and for the parameter count (the score that costs nothing).

Each plan's result is saved under --out as it finishes (`--only` splits the list between
processes writing to one folder; the run resumes; `--build-only` rebuilds the plans without
scoring them, so that the seconds per candidate can be timed later on a quieter machine). Only the training and validation folders
are read.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

# The table's plans were made in the default memory layout; a search's trajectory can tip on
# channels-last rounding (MorphNet's did: cifar10_table.md, twelfth session), so they are
# rebuilt in that layout unless the environment says otherwise (graphsearch/train.py).
os.environ.setdefault("GRAPHSEARCH_CHANNELS_LAST", "0")
sys.path.insert(0, str(Path(__file__).resolve().parent))
import peer  # noqa: E402
from rank_correlation import cheap_scores, kendall_tau, score_entries  # noqa: E402

from graphsearch.data import load_dataset  # noqa: E402
from graphsearch.evaluator import validation_indices  # noqa: E402
from graphsearch.zoo import build  # noqa: E402


# scores also read as the validation log-likelihood (the "~nll" rows: minus the mean cross
# entropy, higher is better), smoother than top-1 where most candidates are near chance
NLL_SCORES = ("sliced", "adaptive-bn-256", "adaptive-bn-1024", "bn-256+steps-30")


def concordant_apart(score, truth, gap: float = 0.5) -> float:
    """Share of the plan pairs whose truths differ by more than `gap` points (more than the
    fine-tuning seeds' spread, about 0.5) that the score orders the same way."""
    pairs = [(i, j) for i in range(len(truth)) for j in range(i + 1, len(truth))
             if abs(truth[i] - truth[j]) > gap]
    if not pairs:
        return float("nan")
    return float(np.mean([(score[i] - score[j]) * (truth[i] - truth[j]) > 0 for i, j in pairs]))


def label(entry: dict) -> str:
    seed = entry.get("search_seed", 0)
    return (f"{entry['plan']} r{entry['round_to']}" + (f" search{seed}" if seed else ""))


def path_of(out: Path, i: int) -> Path:
    return out / f"plan-{i:03d}.json"


def table(truth: list[dict], out: Path) -> str:
    rows, missing, other = [], [], []
    for i, entry in enumerate(truth):
        p = path_of(out, i)
        if not p.exists():
            missing.append(label(entry))
            continue
        r = json.loads(p.read_text())
        if r["params"] != entry["params"]:
            other.append(f"{label(entry)} (rebuilt {r['params']:,} parameters, the table's "
                         f"{entry['params']:,})")
            continue
        if r.get("scores"):
            rows.append((entry, r))
    if len(rows) < 3:
        return f"{len(rows)} plans scored: too few for a correlation"
    val = [e["val"] for e, _ in rows]
    names = list(dict.fromkeys(k for _, r in rows for k in r["scores"]))
    lines = [f"{len(rows)} plans; truth: mean validation top-1 after the table's fine-tune, "
             f"{min(val):.2f}-{max(val):.2f}%", "",
             "| cheap score | plans | Kendall tau | tau without the outliers (truth < 82%) "
             "| pairs > 0.5 points apart ordered right | s per candidate |",
             "|---|---:|---:|---:|---:|---:|"]
    keep = [j for j, v in enumerate(val) if v >= 82]
    stats = []
    for k in names:
        have = [(e, r) for e, r in rows if k in r["scores"]]
        s = [r["scores"][k]["accuracy"] for _, r in have]
        t = [e["val"] for e, _ in have]
        inner = [j for j, (e, _) in enumerate(have) if e["val"] >= 82]
        stats.append((kendall_tau(s, t), kendall_tau([s[j] for j in inner], [t[j] for j in inner]),
                      concordant_apart(s, t), k,
                      np.mean([r["scores"][k]["seconds"] for _, r in have]), len(have)))
    params = [r["params"] for _, r in rows]
    stats.append((kendall_tau(params, val), kendall_tau([params[j] for j in keep],
                                                        [val[j] for j in keep]),
                  concordant_apart(params, val), "parameters kept (no evaluation)", 0.0,
                  len(rows)))
    for tau, inner, apart, k, sec, n in sorted(stats, key=lambda t: (-t[5], -t[0])):
        lines.append(f"| {k} | {n} | {tau:.3f} | {inner:.3f} | {apart:.2f} | {sec:.2f} |")
    cols = [k for k in ("sliced", "adaptive-bn-256@1k", "steps-30", "bn-256+steps-30",
                        "bn-256+distill-30", "bn-256+steps-100") if k in names]
    lines += ["", "| plan | round-to | truth: val top-1 (seeds) | params | search s | " +
              " | ".join(cols) + " |", "|---|---:|---:|---:|---:|" + "---:|" * len(cols)]
    for e, r in sorted(rows, key=lambda er: -er[0]["val"]):
        seed = e.get("search_seed", 0)
        name = e["plan"] + (f" (search seed {seed})" if seed else "")
        lines.append(f"| {name} | {e['round_to']} | {e['val']:.2f} "
                     f"({e['seeds']}) | {r['params']:,} | {r['search_seconds']:.0f} | " +
                     " | ".join(f"{r['scores'][k]['accuracy'] * 100:.2f}"
                                if k in r["scores"] else "-" for k in cols) + " |")
    if other:
        lines += ["", "Left out (the current code makes another plan): " + "; ".join(other)]
    if missing:
        lines += ["", "Not scored yet: " + "; ".join(missing)]
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--weights", type=Path)
    ap.add_argument("--train")
    ap.add_argument("--val")
    ap.add_argument("--truth", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--only", type=int, nargs="+", help="only these entries of --truth")
    ap.add_argument("--flops", type=float, default=1 / 3)
    ap.add_argument("--search-images", type=int, default=8000)
    ap.add_argument("--search-epochs", type=float, default=2.0)
    ap.add_argument("--steps", type=int, nargs=2, default=[30, 100], metavar=("K1", "K2"))
    ap.add_argument("--seed", type=int, default=0, help="the scores' training seed")
    ap.add_argument("--scores", nargs="+", help="only these cheap scores (names as in the "
                    "table, without @1k or ~nll)")
    ap.add_argument("--build-only", action="store_true",
                    help="rebuild and save the plans, score none (the searches need no quiet "
                         "machine; the scores' seconds do)")
    ap.add_argument("--table", action="store_true")
    args = ap.parse_args(argv)
    truth = json.loads(args.truth.read_text())["plans"]
    args.out.mkdir(parents=True, exist_ok=True)
    if args.table:
        print(table(truth, args.out))
        return 0
    if not (args.weights and args.train and args.val):
        sys.exit("--weights, --train and --val are needed to score (or give --table)")
    torch.set_num_threads(1)
    data = load_dataset(args.train, val_data=args.val, val_fraction=0.0, test_fraction=0.0)
    baseline = build("resnet20")
    baseline.load_state_dict(torch.load(args.weights))
    teacher = copy.deepcopy(baseline).eval()
    part = validation_indices(len(data.val), 1000).numpy()  # the evaluator's fixed part
    scores = cheap_scores(*args.steps)
    if args.scores:
        unknown = sorted(set(args.scores) - set(scores))
        if unknown:
            sys.exit(f"--scores {' '.join(unknown)}: not a cheap score; choose from "
                     f"{', '.join(scores)}")
        scores = {k: v for k, v in scores.items() if k in args.scores}
    args.tp_step = 0.01
    for i, entry in enumerate(truth):
        if args.only is not None and i not in args.only:
            continue
        path = path_of(args.out, i)
        row = json.loads(path.read_text()) if path.exists() else None
        if row is not None and row.get("label") != label(entry):
            sys.exit(f"{path} holds {row.get('label')!r}, entry {i} is {label(entry)!r}: the "
                     "truth file changed since that run; use another --out")
        if row is None:
            args.round_to, args.search_seed = entry["round_to"], entry.get("search_seed", 0)
            t0 = time.time()
            pruned = peer.plan_module(baseline, entry["plan"], args, data)
            row = {"label": label(entry), "params": sum(p.numel() for p in pruned.parameters()),
                   "widths": peer.widths(pruned), "search_seconds": time.time() - t0,
                   "load": os.getloadavg()[0], "scores": {}}
            torch.save(pruned, args.out / f"plan-{i:03d}.pt")
            path.write_text(json.dumps(row, indent=1))
            if row["params"] != entry["params"]:
                print(f"{i:3d} {label(entry)}: {row['params']:,} parameters, the table's "
                      f"{entry['params']:,}: not the table's plan, not scored", flush=True)
                continue
        elif row["params"] != entry["params"]:
            continue
        if args.build_only:
            continue
        pruned = torch.load(args.out / f"plan-{i:03d}.pt", weights_only=False)
        for key, settings in scores.items():
            nll = key in NLL_SCORES
            if key in row["scores"] and (not nll or key + "~nll" in row["scores"]):
                continue
            row["scores"].update(score_entries(copy.deepcopy(pruned), data, settings, key,
                                               part, args.seed, teacher, nll))
            path.write_text(json.dumps(row, indent=1))
        print(f"{i:3d} {label(entry)}: truth {entry['val']:.2f}  " + "  ".join(
            f"{k} {row['scores'][k]['accuracy']:.2%}" for k in scores), flush=True)
    print(table(truth, args.out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
