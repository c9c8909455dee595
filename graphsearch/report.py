"""Reports of an optimize run: report.json (for machines), report.md (for people) and a
trade-off plot (validation accuracy against FLOPs: baseline, candidates tried, result).

Accuracies: `accuracy` (and `val_accuracy`, the same number) is top-1 on the validation
split, the one every decision was made on; `test_accuracy` is top-1 on the test split,
measured once at the end and never used for a decision: that is the figure to compare
methods by. `split_check` says whether the held-out splits look unseen by the baseline
(see :func:`split_check`).
"""

from __future__ import annotations

import io
import json
import math
import platform
import time
from pathlib import Path

import torch

from .checkpoint import write_atomic
from .evaluator import STATS_FILE
from .methods.common import method_evidence
from .units import human


def write_reports(run, baseline: dict, proposal, plan, final: dict, exported: dict) -> dict:
    cfg = run.config
    graph = run.graph
    base = graph.baseline
    lat_b, lat_a = exported["latency_before"], exported["latency_after"]
    result = {
        "accuracy": final["accuracy"],
        "val_accuracy": final["accuracy"],
        "test_accuracy": final.get("test_accuracy"),
        "accuracy_before_finetune": final["accuracy_before_finetune"],
        "macs": int(plan.achieved["macs"]), "flops": int(plan.achieved["flops"]),
        "params": int(plan.achieved["params"]),
        "latency_ms": lat_a["median_ms"],
    }
    report = {
        "model": cfg.model,
        "method": cfg.method,
        "settings": proposal.info.get("settings", {}),
        "targets": [{"metric": c.metric, "limit": c.limit, "requested": c.requested}
                    for c in run.constraints],
        "round_to": run.round_to,
        "round_to_choice": run.round_to_choice,
        "baseline": {"accuracy": baseline["accuracy"], "val_accuracy": baseline["accuracy"],
                     "test_accuracy": baseline.get("test_accuracy"),
                     "train_accuracy": baseline.get("train_accuracy"), **base.as_dict(),
                     "latency_ms": lat_b["median_ms"]},
        "result": result,
        "accuracy_split": "validation",
        "metric": run.data.preprocessing.get("metric", "top-1"),
        "splits": splits_summary(run.data.preprocessing),
        "split_check": split_check(baseline, run.data.preprocessing, run.data.num_classes,
                                   weights_given=run.weights is not None),
        "ratios": {"flops": result["flops"] / base.flops, "params": result["params"] / base.params,
                   "latency": _latency_ratio(lat_b, lat_a)},
        "widths": {str(g.id): {"width": plan.widths.get(g.id, g.size), "size": g.size,
                               "members": g.members[:3]} for g in graph.groups},
        "keep": {str(k): v for k, v in plan.keep.items()},
        "search_seconds": proposal.info.get("seconds"),
        "epochs": {"baseline": baseline.get("epochs", 0),
                   "search": proposal.info.get("epochs", 0),
                   "finetune": final["epochs"]},
        "latency": {"before": lat_b, "after": lat_a,
                    "at_batch": exported.get("latency_at_batch") or {},
                    "model": _latency_model_info(run, plan)},
        "preprocessing": run.data.preprocessing,
        "outputs": {"onnx": "model.onnx", "portable": "model.pt2", "plot": "tradeoff.png"},
        "method_info": {k: v for k, v in proposal.info.items() if k not in ("settings",)},
        "finetune_recipe": final.get("recipe"),
        "finetune_history": final.get("history", []),
        "environment": {"torch": torch.__version__, "python": platform.python_version(),
                        "threads": torch.get_num_threads(), "date": time.strftime("%Y-%m-%d")},
        "notes": run.notes,
        "analysis_warnings": list(getattr(run, "warnings", [])),
    }
    report["evaluations"] = evaluation_stats(getattr(run, "state", None))
    report["latency"]["warnings"] = latency_warnings(report)
    report["failed_targets"] = _failed_targets(report)
    out = run.out
    write_atomic(out / "report.json", json.dumps(report, indent=2, default=_jsonable))
    _plot(out / "tradeoff.png", report)
    write_atomic(out / "report.md", markdown(report))
    return report


def _latency_model_info(run, plan) -> dict:
    """Requested, predicted and measured latency of the target step, and the model's fit."""
    model = getattr(run, "latency_model", None)
    a = plan.achieved
    if model is None or "latency_target_ms" not in a:
        return {"fit": getattr(model, "fit", None)} if model is not None else {}
    return {"requested_ms": a.get("latency_target_ms"), "predicted_ms": a.get(
        "latency_predicted"), "measured_in_search_ms": a.get("latency"),
        "rounds": a.get("latency_rounds", []), "fit": getattr(model, "fit", None)}


def evaluation_stats(state) -> dict:
    """What the search's candidate evaluator(s) spent in this process, summed over the
    `stats.json` files next to their caches: evaluations run, read back from the cache
    (finished before an interruption), and retried after a lost worker process or Ray node.
    Empty for methods without an evaluator."""
    total: dict = {}
    if state is None:
        return total

    for f in sorted(Path(state).glob(f"evals-*/{STATS_FILE}")):
        try:
            d = json.loads(f.read_text())
        except (OSError, ValueError):
            continue
        for k in ("fresh", "cached", "retried"):
            total[k] = total.get(k, 0) + int(d.get(k, 0))
        total["backend"] = d.get("backend", "")
    return total


def _latency_ratio(before: dict, after: dict) -> float:
    """after / before: the median of the per-pair ratios when the two were timed interleaved
    (`latency_pair`: both under the same load), else the ratio of the medians."""
    pair = after.get("pair") or {}
    if pair.get("ratio") is not None:
        return float(pair["ratio"])
    return after["median_ms"] / before["median_ms"]


def latency_warnings(r: dict) -> list[str]:
    """Why a latency ratio of the report is not to be trusted (spread, load), per batch."""
    lat = r.get("latency") or {}
    rows = [lat.get("after") or {}, (lat.get("at_batch") or {}).get("after") or {}]
    return [f"batch {a.get('batch_size')}: {a['pair']['warning']}" for a in rows
            if (a.get("pair") or {}).get("warning")]


def _failed_targets(r: dict) -> list[str]:
    """A target the final model misses, in words (latency: the export stage's measurement)."""
    out = []
    for t in r["targets"]:
        if t["metric"] == "latency":
            got = r["result"]["latency_ms"]
        else:
            got = r["result"][t["metric"]]
        if got > t["limit"] * (1 + 1e-9):
            line = (f"{t['metric']} {_fmt(got, t['metric'])} measured, above the target "
                    f"{_fmt(t['limit'], t['metric'])} (asked {t['requested']}; "
                    f"{got / t['limit'] - 1:+.1%})")
            if t["metric"] == "latency":
                line += _latency_advice(r, t["limit"])
            out.append(line)
    return out


def _latency_advice(r: dict, limit: float) -> str:
    """What to do about a missed latency target, from readings under the export's conditions:
    the search's readings are scaled by how much slower (or faster) the baseline ran at export
    than when the target was set, so that the advice never names a latency under the target
    as the one to relax it to."""
    lat = r.get("latency") or {}
    model = lat.get("model") or {}
    rounds = model.get("rounds") or []
    calibration = (model.get("fit") or {}).get("calibration") or [{}]
    base_then = calibration[0].get("measured_ms")  # when the target was set
    base_now = (lat.get("before") or {}).get("median_ms")  # at export, beside the result
    pair = (lat.get("after") or {}).get("pair") or {}
    factor = base_now / base_then if base_then and base_now else None
    if factor is not None and pair.get("ratio") is not None and \
            pair["ratio"] * base_then <= limit:
        return (f"; timed beside the baseline the result runs at {pair['ratio']:.3f} of its "
                f"latency, {pair['ratio'] * base_then:.3f} ms at the baseline's "
                f"{base_then:.3f} ms when the target was set, within it: the machine ran "
                f"{factor:.2f}x slower at export (baseline {base_now:.3f} ms); measure again "
                "on a quiet machine rather than relaxing the target")
    if not rounds:
        return ""
    best_then = min(x["measured_ms"] for x in rounds)
    best_now = best_then * factor if factor is not None else best_then
    if best_now > limit:
        scaled = (f", about {best_now:.3f} ms at the export's speed (the baseline ran "
                  f"{base_then:.3f} ms then, {base_now:.3f} ms at export)"
                  if factor is not None else "")
        return (f"; the fastest plan measured in the search ran at {best_then:.3f} ms{scaled}: "
                f"the best reachable latency here, relax the target to at least "
                f"{best_now:.3f} ms")
    return (f"; the search measured a plan at {best_then:.3f} ms, within the target"
            + (f" (about {best_now:.3f} ms at the export's speed)" if factor is not None else "")
            + ": the readings differ with the machine's load; measure again on a quiet "
            "machine rather than relaxing the target")


def _latency_lines(r: dict) -> list[str]:
    la, lb = r["latency"]["after"], r["latency"]["before"]
    lines = ["", "## Latency (onnxruntime)", "",
             f"Provider {', '.join(la.get('providers') or ['CPUExecutionProvider'])}, "
             f"{la['threads']} intra-op thread(s), median of {la['repeats']} runs after 10 "
             "warm-up runs.", "",
             "Before and after are timed interleaved (before, after, before, ...), so both "
             "see the same load; the latency ratio is the median of the per-pair ratios, "
             "p10-p90 their spread; load: the 1-minute load average per CPU.", "",
             "| batch | before ms | after ms | latency ratio | ratio p10-p90 | load | speed-up "
             "| FLOPs ratio |",
             "|---|---|---|---|---|---|---|---|"]
    rows = [(lb, la)]
    ab = r["latency"].get("at_batch") or {}
    if ab:
        rows.append((ab["before"], ab["after"]))
    for b, a in rows:
        ratio = _latency_ratio(b, a)
        pair = a.get("pair") or {}
        spread = (f"{pair['ratio_p10']:.3f}-{pair['ratio_p90']:.3f}"
                  if pair.get("ratio_p10") is not None else "n/a")
        load = a.get("load_per_cpu")
        lines.append(f"| {a['batch_size']} | {b['median_ms']:.3f} | {a['median_ms']:.3f} | "
                     f"{ratio:.3f} | {spread} | "
                     f"{'n/a' if load is None else f'{load:.2f}'} | {1 / ratio:.2f}x | "
                     f"{r['ratios']['flops']:.3f} |")
    for w in r["latency"].get("warnings", []):
        lines += ["", f"**Warning:** {w}"]
    choice = r.get("round_to_choice")
    lines.append("")
    if choice:
        lines.append(f"Channel multiple: {r['round_to']} (`--round-to auto`: {choice['reason']}; "
                     + ", ".join(f"{m}: {g:.2f}x" for m, g in choice["gains"].items())
                     + " per-channel speed by multiple).")
    else:
        lines.append(f"Channel multiple: {r['round_to']} (as given).")
    m = r["latency"].get("model") or {}
    if m.get("requested_ms") is not None:
        lines += ["", f"Latency target: requested {m['requested_ms']:.3f} ms, the model "
                  f"predicted {m['predicted_ms']:.3f} ms, measured in the search "
                  f"{m['measured_in_search_ms']:.3f} ms, measured at export "
                  f"{r['result']['latency_ms']:.3f} ms (" + "; ".join(
                      f"aim {x['aim_ms']:.3f}: predicted {x['predicted_ms']:.3f}, measured "
                      f"{x['measured_ms']:.3f}" for x in m.get("rounds", [])) + ")."]
    fit = m.get("fit") or {}
    if fit.get("held_out"):
        lines += ["", "Latency model (per-layer tables measured in onnxruntime, "
                  f"{fit.get('distinct_layers')} distinct layers): held-out plans "
                  + "; ".join(f"{c['plan']}: predicted {c['predicted_ms']:.3f} ms, measured "
                              f"{c['measured_ms']:.3f} ms ({c['error']:+.1%})"
                              for c in fit["held_out"]) + "."]
    for f in r.get("failed_targets", []):
        lines += ["", f"**FAILED TARGET**: {f}"]
    return lines


def _jsonable(o):
    if hasattr(o, "tolist"):
        return o.tolist()
    if isinstance(o, (set, frozenset, tuple)):
        return list(o)
    return str(o)


def markdown(r: dict) -> str:
    b, s = r["baseline"], r["result"]
    check = r.get("split_check", {})
    lines = [
        f"# graphsearch: {r['method']} on {Path(r['model']).name}",
        "",
    ]
    for w in check.get("warnings", []) + r.get("latency", {}).get("warnings", []):
        lines += [f"**Warning:** {w}", ""]
    lines += [
        "Targets: " + "; ".join(f"{t['metric']} <= {_fmt(t['limit'], t['metric'])} "
                                f"(asked {t['requested']})" for t in r["targets"])
        + (f"; channels in multiples of {r['round_to']}" if r["round_to"] != 1 else ""),
        "",
        f"| | {_metric(r)} test | {_metric(r)} validation | MFLOPs | params | "
        "latency (ms, onnxruntime) |",
        "|---|---|---|---|---|---|",
        f"| baseline | {_pct(b.get('test_accuracy'))} | {_pct(b['accuracy'])} | "
        f"{b['flops'] / 1e6:.2f} | {b['params']:,} | {b['latency_ms']:.3f} |",
        f"| {r['method']} | {_pct(s.get('test_accuracy'))} | {_pct(s['accuracy'])} | "
        f"{s['flops'] / 1e6:.2f} | {s['params']:,} | {s['latency_ms']:.3f} |",
        f"| change | {_pts(b.get('test_accuracy'), s.get('test_accuracy'))} | "
        f"{_pts(b['accuracy'], s['accuracy'])} | "
        f"{r['ratios']['flops']:.3f} | {r['ratios']['params']:.3f} | "
        f"{r['ratios']['latency']:.3f} |",
        "",
        f"Test: {_metric(r)} on the test split, measured once after every decision and used "
        f"for none (compare methods by it). Validation: {_metric(r)} on the split every "
        "decision was "
        "made on (defaults, tuning, candidate ranking), so it flatters the result; it is "
        "what `accuracy` in `report.json` holds.",
        "",
        f"Before fine-tuning the slim model scored {s['accuracy_before_finetune'] * 100:.2f}%. "
        f"Search took {r['search_seconds'] or 0:.1f} s; epochs: baseline "
        f"{r['epochs']['baseline']}, search {r['epochs']['search']}, fine-tuning "
        f"{r['epochs']['finetune']}."
        + _evaluations_line(r.get("evaluations") or {}),
        "",
        *([f"Fine-tuning recipe: {r['finetune_recipe']['text']}.", ""]
          if r.get("finetune_recipe") else []),
        f"Data: {_shares(r['splits'])}.",
        "",
        f"Latency: median of {r['latency']['after']['repeats']} runs, batch "
        f"{r['latency']['after']['batch_size']}, {r['latency']['after']['threads']} thread(s) "
        "(more under Latency).",
        "",
        "Outputs: `model.onnx` (checked against torch in onnxruntime), `model.pt2` (loads with "
        "`torch.export.load(path).module()`, no model code needed), `report.json`, "
        "`tradeoff.png`.",
        "",
        "![trade-off](tradeoff.png)",
        "",
        "## Widths by group",
        "",
        "| group | width | of | members |",
        "|---|---|---|---|",
    ]
    for gid, w in r["widths"].items():
        if w["width"] != w["size"]:
            lines.append(f"| {gid} | {w['width']} | {w['size']} | {', '.join(w['members'])} |")
    details = {k: v for k, v in r["method_info"].items()
               if k not in ("seconds", "candidates") and isinstance(v, (int, float, str, bool))}
    if details or r["settings"]:
        lines += ["", f"## {r['method']}: settings and figures", ""]

        evidence = method_evidence(r["method"], r["method_info"])
        if evidence:
            lines += [evidence, ""]
        if r["settings"]:
            lines.append("Settings: " + ", ".join(f"`{k}={v}`" for k, v in r["settings"].items())
                         + " (change with `--set KEY=VALUE`).")
            lines.append("")
        lines += [f"- {k.replace('_', ' ')}: {v:.4g}" if isinstance(v, float) else
                  f"- {k.replace('_', ' ')}: {v}" for k, v in details.items()]
        lines.append("- the full record (per group, per cycle) is under `method_info` in "
                     "`report.json`")
    lines += _latency_lines(r)
    p = r["preprocessing"]
    if p.get("format") == "user":
        lines += ["", "## Data", "", f"{p.get('source')}; loss: {p.get('loss')}; metric: "
                  f"{p.get('metric')}.", ""]
    else:
        lines += ["", "## Data", "",
                  f"{p.get('source')} ({p.get('format')}), images of {p.get('image_size')}; "
                  f"mean {p.get('mean')}, std {p.get('std')} (of the training split); "
                  f"augmentation: {p.get('augmentation')}; loss: {p.get('loss', 'cross-entropy')}"
                  f"; metric: {p.get('metric', 'top-1')}.", ""]
    splits = r.get("splits", {})
    for role in ("train", "validation", "test"):
        if role in splits:
            sp = splits[role]
            share = sp.get("share_of_data")
            lines.append(f"- {role}: {sp['images']} images"
                         + (f" ({share:.0%} of --data)" if share is not None else "")
                         + f", {sp['source']}; {sp['use']}")
    if check.get("method"):
        lines += ["", f"Check that the held-out splits are unseen: {check['method']}"]
    if r.get("analysis_warnings"):
        lines += ["", "## Analysis warnings", ""] + [f"- {w}" for w in r["analysis_warnings"]]
    if r["notes"]:
        lines += ["", "## Notes", ""] + [f"- {n}" for n in r["notes"]]
    return "\n".join(lines) + "\n"


def _evaluations_line(e: dict) -> str:
    if not e:
        return ""
    return (f" Candidate evaluations ({e.get('backend')}): {e.get('fresh', 0)} run, "
            f"{e.get('cached', 0)} read back from the cache (finished before an "
            f"interruption), {e.get('retried', 0)} retried after a lost worker or node.")


def _metric(r: dict) -> str:
    return "top-1" if r.get("metric", "top-1") == "top-1" else "metric"


def _pct(v) -> str:
    return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v * 100:.2f}%"


def _pts(a, b) -> str:
    if a is None or b is None:
        return "n/a"
    return f"{(b - a) * 100:+.2f} pts"


def _shares(splits: dict) -> str:
    """How --data was shared out between the roles, in a sentence."""
    total = splits.get("data_images")
    parts = []
    for role in ("train", "validation", "test"):
        sp = splits[role]
        n = sp.get("images") or 0
        share = sp.get("share_of_data")
        parts.append(f"{role} {n:,} images" + (
            f" ({share:.0%} of --data)" if share is not None else f" ({sp.get('source')})"))
    head = f"--data held {total:,} images: " if total else ""
    return head + ", ".join(parts)


def splits_summary(pre: dict) -> dict:
    """The three data roles: how many images, where from, what each is used for, and the
    share of --data each one took (None for a role given as its own data)."""
    total = pre.get("data_images")

    def share(n, own: bool):
        return None if own or not total else round((n or 0) / total, 4)
    out = {
        "train": {"images": pre.get("num_train"),
                  "source": f"the rest of {pre.get('source')}",
                  "use": "fits the weights (baseline, search, fine-tuning)"},
        "validation": {"images": pre.get("num_val"), "source": pre.get("val_source", "?"),
                       "use": "every decision: method defaults and tuning, candidate "
                              "ranking, early stopping; `accuracy` is measured on it"},
        "test": {"images": pre.get("num_test", 0), "source": pre.get("test_source", "none"),
                 "use": "reported only (`test_accuracy`), evaluated once at the end; no "
                        "method sees it"},
    }
    out["train"]["share_of_data"] = share(pre.get("num_train"), False)
    out["validation"]["share_of_data"] = share(pre.get("num_val"), not pre.get("val_fraction"))
    out["test"]["share_of_data"] = share(pre.get("num_test"), not pre.get("test_fraction"))
    out["data_images"] = total
    return out


# A difference between two accuracies counts as real beyond this many standard errors.
SEEN_SIGMAS = 3.0
SEEN_MIN_GAP = 0.01  # and beyond one point, so that huge splits do not flag trifles


def _se(p1: float, n1: int, p2: float, n2: int) -> float:
    """Standard error of p1 - p2 for two independent samples of one accuracy (pooled)."""
    p = (p1 * n1 + p2 * n2) / (n1 + n2)
    return math.sqrt(max(p * (1 - p), 1e-12) * (1 / n1 + 1 / n2))


def split_check(baseline: dict, pre: dict, num_classes: int, *,
                weights_given: bool) -> dict:
    """Does the baseline score on the validation split as a model that never saw it would?

    Two tests, each a two-sample comparison of accuracies with a pooled binomial standard
    error (SE):

    1. validation against test: two splits neither of which the weights were trained on are
       two samples of one accuracy, so validation may exceed test by chance only by a few SE.
       A larger lead (over SEEN_SIGMAS SE and SEEN_MIN_GAP) means the weights have likely
       seen the validation split (or it comes from other data than the test split), and the
       decisions were taken on an inflated figure.
    2. for weights given by the user, held-out splits cut out of --data against training
       images (the baseline's top-1 on a sample of the training split, eval mode, no
       augmentation): a model that never saw a split scores lower on it than on the images
       it was fitted on. No gap (held-out within 2 SE of training accuracy, while the model
       is clearly above chance) means the weights were likely trained on the held-out images
       too: then neither validation nor test held out of --data is unseen. (A model that
       does not overfit at all would also show no gap; the warning says so.)

    Returns {"method": text, "comparisons": [...], "warnings": [text, ...]}.
    """
    if pre.get("metric", "top-1") != "top-1":
        return {"method": "not checked: the metric is model.py's evaluate(), not a share of "
                          "samples, so its chance spread is unknown",
                "comparisons": [], "warnings": []}
    out = {"method": (f"validation vs test top-1 (a lead over {SEEN_SIGMAS:g} standard "
                      f"errors and {SEEN_MIN_GAP * 100:g} point means the validation split "
                      "was likely seen); for given weights, held-out splits of --data vs "
                      "top-1 on training images (no gap within 2 standard errors means they "
                      "were likely trained on)."),
           "comparisons": [], "warnings": []}
    val, test = baseline.get("accuracy"), baseline.get("test_accuracy")
    n_val, n_test = int(pre.get("num_val") or 0), int(pre.get("num_test") or 0)
    if val is not None and test is not None and n_val and n_test:
        se = _se(val, n_val, test, n_test)
        limit = max(SEEN_SIGMAS * se, SEEN_MIN_GAP)
        seen = val - test > limit
        out["comparisons"].append({"what": "validation - test", "difference": val - test,
                                   "standard_error": se, "limit": limit, "flagged": seen})
        if seen:
            out["warnings"].append(
                f"the baseline scores {val * 100:.2f}% on the validation split but "
                f"{test * 100:.2f}% on the test split, {(val - test) * 100:.2f} points more "
                f"than chance allows ({limit * 100:.2f} for {n_val} and {n_test} images): its "
                "weights have likely seen the validation split (or it is other data than the "
                "test split). Every decision was made on that split; pass --val-data with "
                "images the weights were never trained on.")
    train_acc = baseline.get("train_accuracy")
    n_train = int(baseline.get("train_accuracy_images") or 0)
    chance = 1.0 / max(num_classes, 1)
    if weights_given and train_acc is not None and n_train and train_acc > chance + 0.1:
        carved = [("validation", val, n_val, float(pre.get("val_fraction") or 0) > 0),
                  ("test", test, n_test, float(pre.get("test_fraction") or 0) > 0)]
        for role, acc, n, from_data in carved:
            if acc is None or not n or not from_data:
                continue
            se = _se(train_acc, n_train, acc, n)
            seen = train_acc - acc < 2 * se
            out["comparisons"].append({"what": f"training images - {role}",
                                       "difference": train_acc - acc, "standard_error": se,
                                       "limit": 2 * se, "flagged": seen})
            if seen:
                out["warnings"].append(
                    f"the given weights score {acc * 100:.2f}% on the {role} split held out "
                    f"of --data and {train_acc * 100:.2f}% on training images: no "
                    "generalisation gap, so they were likely trained on the held-out images "
                    "too (or do not overfit at all). If they were trained on all of --data, "
                    f"its {role} split is not unseen: pass --val-data and --test-data with "
                    "images the weights never saw.")
    return out


def _fmt(v: float, metric: str) -> str:
    return human(v, "ms" if metric == "latency" else "")


def _plot(path: Path, r: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    cands = r["method_info"].get("candidates") or []
    if cands:
        ax.scatter([c["flops"] / 1e6 for c in cands], [c["accuracy"] * 100 for c in cands],
                   s=18, c="#999999", label="candidates tried")
    b, s = r["baseline"], r["result"]
    ax.scatter([b["flops"] / 1e6], [b["accuracy"] * 100], s=60, c="#1f77b4", label="baseline")
    ax.scatter([s["flops"] / 1e6], [s["accuracy"] * 100], s=80, marker="*", c="#d62728",
               label=f"{r['method']} (fine-tuned)")
    ax.scatter([s["flops"] / 1e6], [s["accuracy_before_finetune"] * 100], s=30, marker="x",
               c="#d62728", label="before fine-tuning")
    for t in r["targets"]:
        if t["metric"] == "flops":
            ax.axvline(t["limit"] / 1e6, ls="--", c="#555555", lw=1, label="FLOPs target")
    ax.set_xlabel("MFLOPs")
    ax.set_ylabel(f"{_metric(r)} on the validation split (%)")
    ax.set_title(f"{r['method']} on {Path(r['model']).name}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    write_atomic(path, buf.getvalue())
