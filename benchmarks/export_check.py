"""Export every zoo model to ONNX, check it against torch and time both.

For each model of ``graphsearch.zoo.MODELS``: ``passes.export_onnx`` into a
temporary directory (checker + onnxruntime vs torch at the example batch and at
batch 3), the largest absolute / relative difference, ONNX Runtime CPU latency
(``passes.latency``) and eager torch latency, both batch 1 with the same thread
count. Prints a markdown table and writes it, with the command, date and
versions, to ``benchmarks/results/export_check.md``.

    python benchmarks/export_check.py [--models resnet20 vit_tiny] [--threads 1] [--repeats 20]
"""

from __future__ import annotations

import argparse
import datetime as _dt
import os
import platform
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run from a checkout without an (up-to-date) install
    sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import onnx  # noqa: E402
import onnxruntime  # noqa: E402
import torch  # noqa: E402

from graphsearch import zoo  # noqa: E402
from graphsearch.passes import ExportError, ExportMismatch, export_onnx  # noqa: E402
from graphsearch.passes.latency import latency  # noqa: E402


def torch_latency(model, inputs, *, threads: int, warmup: int, repeats: int) -> tuple[float, float, float]:
    """Median, p10, p90 of eager ``model(*inputs)`` in ms under ``torch.no_grad``."""
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with torch.no_grad():
            for _ in range(warmup):
                model(*inputs)
            times = []
            for _ in range(repeats):
                t0 = time.perf_counter_ns()
                model(*inputs)
                times.append((time.perf_counter_ns() - t0) / 1e6)
    finally:
        torch.set_num_threads(old)
    return statistics.median(times), float(np.percentile(times, 10)), float(np.percentile(times, 90))


def max_rel_diff(model, inputs, onnx_path) -> float:
    """Largest |onnx - torch| / max|torch| at the example batch (scale-free companion to max abs diff)."""
    sess = onnxruntime.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    with torch.no_grad():
        ref = model(*inputs).numpy()
    out = sess.run(None, {i.name: t.numpy() for i, t in zip(sess.get_inputs(), inputs)})[0]
    return float(np.abs(out - ref).max() / max(np.abs(ref).max(), 1e-30))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="*", default=list(zoo.MODELS), help="zoo model names (default: all)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--exporter", default="auto", choices=["auto", "torchscript", "dynamo"])
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "export_check.md")
    args = parser.parse_args(argv)

    command = "python " + " ".join(shlex.quote(a) for a in [str(Path(sys.argv[0]).as_posix())] + sys.argv[1:])
    header = [
        "# ONNX export check for the zoo",
        "",
        f"Command: `{command}`",
        "",
        f"Date: {_dt.datetime.now().astimezone().strftime('%Y-%m-%d %H:%M %Z')}",
        "",
        f"Versions: python {platform.python_version()}, torch {torch.__version__}, onnx {onnx.__version__}, "
        f"onnxruntime {onnxruntime.__version__}; {platform.machine()} {platform.processor() or ''} "
        f"({platform.system()}), {os.cpu_count()} CPUs; load average at start "
        f"{' / '.join(f'{x:.2f}' for x in os.getloadavg())} (1 / 5 / 15 min; other jobs share this machine, "
        "so the p90 columns show the noise)",
        "",
        f"Every model exported with `passes.export_onnx` (exporter `{args.exporter}`, dynamic batch, checked in "
        f"onnxruntime at the example batch and at batch 3, tolerance per output: max abs diff <= 1e-5 + 1e-4 * max |torch|). "
        f"Latency: batch 1, {args.threads} thread(s), {args.warmup} warm-up runs, {args.repeats} timed runs, "
        "median (p10-p90) in ms; ONNX Runtime CPUExecutionProvider with all graph optimisations, "
        "torch eager under `no_grad`. Max rel diff = max |onnx - torch| / max |torch| at batch 1.",
        "",
    ]
    columns = ["model", "params (M)", "exporter", "opset", "export s", "ONNX MB", "max abs diff",
               "max rel diff", "ORT ms", "torch ms", "torch / ORT"]
    rows = [
        "| " + " | ".join(columns) + " |",
        "|" + "|".join(["---"] + ["---:"] * (len(columns) - 1)) + "|",
    ]
    problems = []
    print("\n".join(header), flush=True)
    print("\n".join(rows), flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models:
            model = zoo.build(name)
            inputs = zoo.example_inputs(name)
            params = sum(p.numel() for p in model.parameters()) / 1e6
            t0 = time.perf_counter()
            try:
                result = export_onnx(model, inputs, Path(tmp) / f"{name}.onnx", exporter=args.exporter)
            except (ExportError, ExportMismatch) as exc:
                problems.append(f"- **{name}**: {type(exc).__name__}: {exc}")
                row = [name, f"{params:.2f}", "failed"] + ["-"] * (len(columns) - 3)
                rows.append("| " + " | ".join(row) + " |")
                print(rows[-1], flush=True)
                continue
            export_s = time.perf_counter() - t0
            rel = max_rel_diff(model, inputs, result.path)
            ort_lat = latency(result.path, threads=args.threads, warmup=args.warmup, repeats=args.repeats)
            t_med, t_p10, t_p90 = torch_latency(model, inputs, threads=args.threads, warmup=args.warmup,
                                                repeats=args.repeats)
            row = [
                name, f"{params:.2f}", result.exporter, str(result.opset), f"{export_s:.1f}",
                f"{result.file_size / 1e6:.1f}", f"{result.max_abs_diff:.1e}", f"{rel:.1e}",
                f"{ort_lat.median_ms:.2f} ({ort_lat.p10_ms:.2f}-{ort_lat.p90_ms:.2f})",
                f"{t_med:.2f} ({t_p10:.2f}-{t_p90:.2f})", f"{t_med / ort_lat.median_ms:.2f}x",
            ]
            rows.append("| " + " | ".join(row) + " |")
            print(rows[-1], flush=True)
            result.path.unlink()

    load_end = " / ".join(f"{x:.2f}" for x in os.getloadavg())
    footer = ["", f"Load average at end: {load_end}.", "", "## Problems", "", *(problems or ["None: every model exported and matched torch."]), ""]
    print("\n".join(footer), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(header + rows + footer))
    print(f"wrote {args.out}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
