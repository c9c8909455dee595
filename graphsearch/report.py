"""Reports of an optimize run: report.json (for machines), report.md (for people) and a
trade-off plot (validation accuracy against FLOPs: baseline, candidates tried, result)."""

from __future__ import annotations

import json
import platform
import time
from pathlib import Path

import torch


def write_reports(run, baseline: dict, proposal, plan, final: dict, exported: dict) -> dict:
    cfg = run.config
    graph = run.graph
    base = graph.baseline
    lat_b, lat_a = exported["latency_before"], exported["latency_after"]
    result = {
        "accuracy": final["accuracy"],
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
        "round_to": cfg.round_to,
        "baseline": {"accuracy": baseline["accuracy"], **base.as_dict(),
                     "latency_ms": lat_b["median_ms"]},
        "result": result,
        "ratios": {"flops": result["flops"] / base.flops, "params": result["params"] / base.params,
                   "latency": lat_a["median_ms"] / lat_b["median_ms"]},
        "widths": {str(g.id): {"width": plan.widths.get(g.id, g.size), "size": g.size,
                               "members": g.members[:3]} for g in graph.groups},
        "keep": {str(k): v for k, v in plan.keep.items()},
        "search_seconds": proposal.info.get("seconds"),
        "epochs": {"baseline": baseline.get("epochs", 0),
                   "search": proposal.info.get("epochs", 0),
                   "finetune": final["epochs"]},
        "latency": {"before": lat_b, "after": lat_a},
        "preprocessing": run.data.preprocessing,
        "outputs": {"onnx": "model.onnx", "portable": "model.pt2", "plot": "tradeoff.png"},
        "method_info": {k: v for k, v in proposal.info.items() if k not in ("settings",)},
        "finetune_history": final.get("history", []),
        "environment": {"torch": torch.__version__, "python": platform.python_version(),
                        "threads": torch.get_num_threads(), "date": time.strftime("%Y-%m-%d")},
        "notes": run.notes,
    }
    out = run.out
    _atomic_text(out / "report.json", json.dumps(report, indent=2, default=_jsonable))
    _plot(out / "tradeoff.png", report)
    _atomic_text(out / "report.md", markdown(report))
    return report


def _jsonable(o):
    if hasattr(o, "tolist"):
        return o.tolist()
    if isinstance(o, (set, frozenset, tuple)):
        return list(o)
    return str(o)


def _atomic_text(path: Path, text: str) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)


def markdown(r: dict) -> str:
    b, s = r["baseline"], r["result"]
    lines = [
        f"# graphsearch: {r['method']} on {Path(r['model']).name}",
        "",
        "Targets: " + "; ".join(f"{t['metric']} <= {_fmt(t['limit'], t['metric'])} "
                                f"(asked {t['requested']})" for t in r["targets"])
        + (f"; channels in multiples of {r['round_to']}" if r["round_to"] > 1 else ""),
        "",
        "| | top-1 (val) | MFLOPs | params | latency (ms, onnxruntime) |",
        "|---|---|---|---|---|",
        f"| baseline | {b['accuracy'] * 100:.2f}% | {b['flops'] / 1e6:.2f} | {b['params']:,} | "
        f"{b['latency_ms']:.3f} |",
        f"| {r['method']} | {s['accuracy'] * 100:.2f}% | {s['flops'] / 1e6:.2f} | "
        f"{s['params']:,} | {s['latency_ms']:.3f} |",
        f"| ratio | {(s['accuracy'] - b['accuracy']) * 100:+.2f} pts | "
        f"{r['ratios']['flops']:.3f} | {r['ratios']['params']:.3f} | "
        f"{r['ratios']['latency']:.3f} |",
        "",
        f"Before fine-tuning the slim model scored {s['accuracy_before_finetune'] * 100:.2f}%. "
        f"Search took {r['search_seconds'] or 0:.1f} s; epochs: baseline "
        f"{r['epochs']['baseline']}, search {r['epochs']['search']}, fine-tuning "
        f"{r['epochs']['finetune']}.",
        "",
        f"Latency: median of {r['latency']['after']['repeats']} runs, batch "
        f"{r['latency']['after']['batch_size']}, {r['latency']['after']['threads']} thread(s).",
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
        from .methods.common import method_evidence

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
    p = r["preprocessing"]
    lines += ["", "## Data", "",
              f"{p.get('source')} ({p.get('format')}): {p.get('num_train')} training and "
              f"{p.get('num_val')} validation images of {p.get('image_size')}; mean "
              f"{p.get('mean')}, std {p.get('std')}; augmentation: {p.get('augmentation')}."]
    if r["notes"]:
        lines += ["", "## Notes", ""] + [f"- {n}" for n in r["notes"]]
    return "\n".join(lines) + "\n"


def _fmt(v: float, metric: str) -> str:
    if metric == "latency":
        return f"{v:.3f} ms"
    return f"{v / 1e6:.2f}M"


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
    ax.set_ylabel("top-1 on the validation split (%)")
    ax.set_title(f"{r['method']} on {Path(r['model']).name}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    tmp = path.with_name(path.stem + ".tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    tmp.replace(path)
