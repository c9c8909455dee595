"""How much of each model the channel IR can prune, and whether slim/cost/ONNX are exact.

For every model of a list (the zoo, the examples' `model.py` files, the hand-written models
in other libraries' styles of `tests/coverage_models.py`, and, when the `timm` package is
installed in this environment, a list of its model definitions built without weights):

- analyse it, and report the share of its MACs that some plan can change (`mac_share`),
  with the top reason for the rest;
- compare the analysed MACs with a real count (torch's FLOP counter, grad enabled so that
  torch's fused fast paths, which it does not count, stay off);
- draw a random 50% plan (every prunable group keeps a random half, at least its minimum),
  and check: slim == mask (`verify`, rtol 1e-4), slim params == `graph.cost(plan).params`,
  and the slim model exported to ONNX matches torch in onnxruntime (`export_onnx`).

With `--hf` (the `graphsearch[hf]` extra installed), popular `transformers` classes built
from tiny configs (`benchmarks/hf_models.py`: text, vision, audio) are checked further, into
a `transformers` table (`--hf-out`): the random 50% plan's MACs as a share of the model's
(goal: at most 0.6), slim == mask, params == cost, the model pruned in place
(`graphsearch.prune`: weights, attributes and config) == slim, `save_pretrained` then
`from_pretrained` == the pruned model, `generate()` on the causal LMs, and the slim model in
ONNX (dynamic batch, checked at batch 3).

`timm` needs torchvision, which this project does not install: its imports are satisfied by an
empty stand-in module (`--timm`; only the data transforms import it, no model uses it). timm
is never a dependency of graphsearch: `pip install --no-deps timm` into the venv to run it.

    python benchmarks/coverage.py [--timm] [--models NAME ...] [--out PATH]
    python benchmarks/coverage.py --hf [--models NAME ...] [--hf-out PATH]
"""

from __future__ import annotations

import argparse
import datetime as _dt
import importlib.abc
import importlib.machinery
import os
import platform
import random
import shlex
import sys
import tempfile
import time
import traceback
import types
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
for p in (ROOT, ROOT / "tests"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

import torch  # noqa: E402
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

from graphsearch import analyze, zoo  # noqa: E402
from graphsearch.load import load_model  # noqa: E402
from graphsearch.passes import export_onnx  # noqa: E402
from graphsearch.passes.mask import mask, verify  # noqa: E402
from graphsearch.passes.slim import slim  # noqa: E402

TIMM = [  # name, input size: small variants of the families public model zoos ship
    ("resnet18", 128), ("resnet50d", 128), ("seresnext26d_32x4d", 128), ("res2net50_14w_8s", 128),
    ("resnetv2_50x1_bit", 128), ("nf_resnet26", 128), ("regnetx_002", 128), ("regnety_002", 128),
    ("efficientnet_b0", 128), ("mobilenetv2_100", 128), ("mobilenetv3_small_100", 128),
    ("mixnet_s", 128), ("ghostnet_100", 128), ("densenet121", 128), ("dla34", 128),
    ("convnext_atto", 128), ("mobilevit_xxs", 128), ("deit_tiny_patch16_224", 224),
    ("vit_tiny_patch16_224", 224), ("swin_tiny_patch4_window7_224", 224),
    ("levit_128s", 224), ("tf_mobilenetv3_small_minimal_100", 128), ("cspresnet50", 128),
    ("hrnet_w18_small", 128), ("rexnet_100", 128), ("tinynet_e", 128),
]


def stub_torchvision() -> None:
    """An empty `torchvision` so that `import timm` works without it (benchmark only)."""

    class Anything(types.ModuleType):
        def __getattr__(self, name):
            if name.startswith("__"):
                raise AttributeError(name)

            class Meta(type):
                def __getattr__(cls, attr):
                    if attr.startswith("__"):
                        raise AttributeError(attr)
                    return attr

            made = Meta(name, (object,), {"__init__": lambda self, *a, **k: None})
            setattr(self, name, made)
            return made

    class Finder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
        def find_spec(self, fullname, path, target=None):
            if fullname.split(".")[0] == "torchvision":
                return importlib.machinery.ModuleSpec(fullname, self, is_package=True)
            return None

        def create_module(self, spec):
            m = Anything(spec.name)
            m.__path__ = []
            m.__version__ = "0.0 (stand-in)"
            return m

        def exec_module(self, module):
            pass

    sys.meta_path.insert(0, Finder())


def model_list(use_timm: bool) -> list[tuple[str, str, callable]]:
    """(name, source, builder -> (model, inputs))."""
    out = []
    for name in zoo.MODELS:
        out.append((name, "zoo", lambda n=name: (zoo.build(n), zoo.example_inputs(n))))
    for path in sorted((ROOT / "examples").glob("*.py")):
        if path.name.startswith("_"):
            continue

        def build(p=path):
            loaded = load_model(str(p))
            return loaded.model, tuple(loaded.example_inputs)

        out.append((f"examples/{path.name}", "example", build))
    import coverage_models as cm

    for name, (make, inputs) in cm.MODELS.items():
        out.append((name, "styles", lambda m=make, i=inputs: (m(), i())))
    if use_timm:
        stub_torchvision()
        import timm

        for name, size in TIMM:
            def build(n=name, s=size):
                return timm.create_model(n, pretrained=False, num_classes=10), \
                    (torch.randn(1, 3, s, s),)

            out.append((name, f"timm {timm.__version__}", build))
    return out


def real_macs(model, inputs) -> float:
    counter = FlopCounterMode(display=False)
    with counter, torch.enable_grad(), sdpa_kernel(SDPBackend.MATH):
        model(*inputs)
    return counter.get_total_flops() / 2 / inputs[0].shape[0]


def half_plan(g, seed: int = 0) -> dict:
    rng = random.Random(seed)
    return {grp.id: sorted(rng.sample(range(grp.size), max(grp.min_width, grp.size // 2)))
            for grp in g.prunable_groups}


def short(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
    return text.replace("|", "/")[:110]


def _slim_checks(g, keep, inputs, row: dict, train: bool = True):
    """Slim `keep`, record slim == mask and parameters == cost in `row`; the slim module, or
    None (the failure noted in `row`)."""
    try:
        small = slim(g, keep)
        if not train:
            small.eval()
        v = verify(small, mask(g, keep), inputs, rtol=1e-4)
        row["slim_ok"] = bool(v)
        if not v:
            row["note"] = v.message
        row["params_ok"] = sum(p.numel() for p in small.parameters()) == g.cost(keep).params
    except Exception as exc:  # noqa: BLE001
        row["note"] = f"slim: {short(exc)}"
        return None
    return small


def check(name: str, build) -> dict:
    row = {"model": name}
    torch.manual_seed(0)
    try:
        model, inputs = build()
        model.eval()
        times = []
        for _ in range(2):  # the first call pays one-off imports and caches: take the best
            t0 = time.perf_counter()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                g = analyze(model, inputs)
            times.append(time.perf_counter() - t0)
        row["analyze_s"] = min(times)
        times = []
        with torch.no_grad():
            for _ in range(3):
                t0 = time.perf_counter()
                model(*inputs)
                times.append(time.perf_counter() - t0)
        row["forward_s"] = min(times)
    except Exception as exc:  # noqa: BLE001
        row["note"] = f"analysis failed: {short(exc)}"
        return row
    share = g.mac_share(top=1)
    s = g.summary()
    row.update(groups=s["groups"], prunable=s["prunable"], share=share["share"],
               why=share["reasons"][0][0] if share["reasons"] else "")
    try:
        real = real_macs(model, inputs)
        row["macs_ok"] = abs(g.baseline.macs - real) <= 1e-6 * max(real, 1) + 1
        row["macs_rel"] = (g.baseline.macs - real) / max(real, 1)
    except Exception as exc:  # noqa: BLE001
        row["note"] = f"FLOP count failed: {short(exc)}"
    keep = half_plan(g)
    if not keep:
        row["note"] = row.get("note") or "nothing prunable"
        return row
    small = _slim_checks(g, keep, inputs, row)
    if small is None:
        return row
    try:
        with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
            warnings.simplefilter("ignore")
            export_onnx(small, inputs, Path(tmp) / "m.onnx", check_batch_size=None)
        row["onnx_ok"] = True
    except Exception as exc:  # noqa: BLE001
        row["onnx_ok"] = False
        row["note"] = row.get("note") or f"onnx: {short(exc)}"
    return row


def check_hf(name: str) -> dict:
    """The coverage checks, and those of a Hugging Face model pruned in place."""
    import hf_models

    from graphsearch import hf, prune

    row = {"model": name}
    torch.manual_seed(0)
    try:
        model, inputs, kind = hf_models.build(name)
        row["class"] = type(model).__name__
        t0 = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            g = analyze(model, inputs)
        row["analyze_s"] = time.perf_counter() - t0
        row["front_end"] = g.front_end + (" (static batch)" if g.static_batch else "")
    except Exception as exc:  # noqa: BLE001
        row["note"] = f"analysis failed: {short(exc)}"
        return row
    share = g.mac_share(top=1)
    s = g.summary()
    row.update(groups=s["groups"], prunable=s["prunable"], share=share["share"],
               why=share["reasons"][0][0] if share["reasons"] else "")
    called = hf.Called(model)
    try:
        real = real_macs(called, inputs)
        row["macs_ok"] = abs(g.baseline.macs - real) <= 1e-6 * max(real, 1) + 1
        row["macs_rel"] = (g.baseline.macs - real) / max(real, 1)
    except Exception as exc:  # noqa: BLE001
        row["note"] = f"FLOP count failed: {short(exc)}"
    keep = half_plan(g)
    if not keep:
        row["note"] = row.get("note") or "nothing prunable"
        return row
    row["half_macs"] = g.cost(keep).macs / g.baseline.macs
    x3 = hf_models.inputs(kind, batch=3, seed=1)
    small = _slim_checks(g, keep, x3, row, train=False)
    if small is None:
        return row
    try:
        with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
            warnings.simplefilter("ignore")
            export_onnx(small, inputs, Path(tmp) / "m.onnx")
        row["onnx_ok"] = True
    except Exception as exc:  # noqa: BLE001
        row["onnx_ok"] = False
        row["note"] = row.get("note") or f"onnx: {short(exc)}"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            prune(model, g, keep)
        row["inplace_ok"] = bool(verify(called, small, x3, rtol=1e-4))
    except Exception as exc:  # noqa: BLE001
        row["inplace_ok"] = False
        row["note"] = row.get("note") or f"in place: {short(exc)}"
        return row
    try:
        with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model.save_pretrained(tmp)
            loaded = type(model).from_pretrained(tmp).eval()
        row["reload_ok"] = bool(verify(hf.Called(loaded), called, x3, rtol=1e-5))
        if model.can_generate():
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                out = model.generate(x3[0], max_new_tokens=3, do_sample=False,
                                     pad_token_id=0)
            row["generate_ok"] = tuple(out.shape) == (3, x3[0].shape[1] + 3)
    except Exception as exc:  # noqa: BLE001
        row.setdefault("reload_ok", False)
        row["note"] = row.get("note") or f"save/load/generate: {short(exc)}"
    return row


def hf_table(rows: list[dict], command: str, load0: str, load1: str) -> list[str]:
    import transformers

    lines = [
        "## transformers",
        "",
        f"Command: `{command}` (transformers {transformers.__version__}, torch "
        f"{torch.__version__}, 1 torch thread). Date: "
        f"{_dt.datetime.now(_dt.timezone.utc):%Y-%m-%d %H:%M} UTC; load average {load0} at "
        f"start, {load1} at end: other sessions were running, times are noisy.",
        "",
        "Every model is built from a tiny config (random weights) and analysed through the "
        "torch.export front end (batch 2, dynamic). 50% plan: the MACs left by a random plan "
        "keeping half of every prunable group (goal: at most 0.6). The checks run on a batch "
        "of 3: slim == mask (rtol 1e-4), slim params == cost, in place: the model pruned by "
        "`graphsearch.prune` (weights, attributes, config) equals slim, reload: "
        "`save_pretrained` then `from_pretrained` equals it, generate: `generate()` runs "
        "(causal LMs), ONNX: the slim model in onnxruntime at batch 2 and 3.",
        "",
        "| model | class | groups (prunable) | prunable MACs | MACs = real | 50% plan | "
        "slim == mask | params = cost | in place | reload | generate | ONNX | analyze | "
        "note: first failure, else the top reason MACs are not prunable |",
        "|---|---|---:|---:|---|---:|---|---|---|---|---|---|---:|---|",
    ]
    for r in rows:
        macs = mark(r.get("macs_ok"))
        if r.get("macs_ok") is False:
            macs += f" ({100 * r['macs_rel']:+.2f}%)"
        half = f"{r['half_macs']:.2f}" if "half_macs" in r else ""
        note = r.get("note") or (r.get("why") or "")
        lines.append(
            f"| {r['model']} | {r.get('class', '')} | {r.get('groups', '')} "
            f"({r.get('prunable', '')}) | {share_text(r)} | {macs} | {half} | "
            f"{mark(r.get('slim_ok'))} | {mark(r.get('params_ok'))} | "
            f"{mark(r.get('inplace_ok'))} | {mark(r.get('reload_ok'))} | "
            f"{mark(r.get('generate_ok'))} | {mark(r.get('onnx_ok'))} | "
            f"{r['analyze_s']:.1f} s | {note.replace('|', '/')[:160]} |"
            if "analyze_s" in r else
            f"| {r['model']} | {r.get('class', '')} | | | | | | | | | | | | "
            f"{note.replace('|', '/')[:160]} |")
    keys = ("slim_ok", "params_ok", "inplace_ok", "reload_ok", "onnx_ok")
    good = [r for r in rows if r.get("half_macs", 1) <= 0.6 and all(r.get(k) for k in keys)
            and r.get("generate_ok", True)]
    lines += ["", f"{len(good)} of {len(rows)} models: a random 50% plan leaves at most 0.6 "
              "of the MACs and every check passed; "
              f"{sum(1 for r in rows if r.get('macs_ok') is False)} report MACs that the real "
              "count contradicts."]
    return lines


def write_section(path: Path, lines: list[str]) -> None:
    """Replace the section that starts with `lines[0]` (up to the next one of its level) in
    `path`, or append it."""
    old = path.read_text().splitlines() if path.exists() else []
    head = lines[0]
    if head in old:
        start = old.index(head)
        end = next((i for i in range(start + 1, len(old)) if old[i].startswith("## ")), len(old))
        new = old[:start] + lines + ([""] if end < len(old) else []) + old[end:]
    else:
        new = old + ([""] if old else []) + lines
    path.write_text("\n".join(new) + "\n")


def share_text(r) -> str:
    return f"{100 * r['share']:.1f}%" if "share" in r else ""


def mark(v) -> str:
    return "" if v is None else ("yes" if v else "**no**")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--timm", action="store_true", help="add timm's models (installed)")
    parser.add_argument("--models", nargs="*", help="only these names")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "coverage.md")
    parser.add_argument("--hf", action="store_true",
                        help="only transformers' models (benchmarks/hf_models.py)")
    parser.add_argument("--hf-out", type=Path,
                        default=ROOT / "benchmarks" / "results" / "coverage.md",
                        help="the file whose '## transformers' section the table replaces "
                             "(appended where there is none)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    command = "python " + " ".join(shlex.quote(a) for a in
                                   [Path(sys.argv[0]).as_posix()] + sys.argv[1:])
    load0 = " / ".join(f"{x:.2f}" for x in os.getloadavg())
    if args.hf:
        sys.path.insert(0, str(ROOT / "benchmarks"))
        import hf_models

        rows = []
        for name in hf_models.MODELS:
            if args.models and name not in args.models:
                continue
            try:
                row = check_hf(name)
            except Exception:  # noqa: BLE001
                row = {"model": name, "note": "crashed: " + traceback.format_exc(limit=1)[-100:]}
            rows.append(row)
            print(row, flush=True)
            load1 = " / ".join(f"{x:.2f}" for x in os.getloadavg())
            lines = hf_table(rows, command, load0, load1)  # written as it goes: a slow
            args.hf_out.parent.mkdir(parents=True, exist_ok=True)  # machine leaves the
            write_section(args.hf_out, lines)  # models done so far
        print("\n".join(lines))
        return 0
    rows = []
    for name, source, build in model_list(args.timm):
        if args.models and name not in args.models:
            continue
        try:
            row = check(name, build)
        except Exception:  # noqa: BLE001
            row = {"model": name, "note": "crashed: " + traceback.format_exc(limit=1)[-100:]}
        row["source"] = source
        rows.append(row)
        print(row, flush=True)
    load1 = " / ".join(f"{x:.2f}" for x in os.getloadavg())
    lines = [
        "# Coverage: prunable share of MACs and exactness on model definitions",
        "",
        f"Command: `{command}`",
        "",
        f"Date: {_dt.datetime.now(_dt.timezone.utc):%Y-%m-%d %H:%M} UTC. Machine: {platform.machine()}, "
        f"{os.cpu_count()} CPUs shared with other jobs, torch {torch.__version__}, 1 torch thread; "
        f"load average {load0} at start, {load1} at end (other sessions were running: times "
        "are noisy).",
        "",
        "Prunable MACs: share of the analysed MACs in ops that touch a prunable group. MACs = "
        "real: analysed MACs equal torch's FLOP counter / 2 per sample. The three checks use one "
        "random plan keeping a random half of every prunable group: slim == mask (rtol 1e-4), "
        "slim params == `graph.cost(plan).params`, ONNX (onnxruntime) matches torch.",
        "",
        "| model | source | groups (prunable) | prunable MACs | MACs = real | slim == mask | params = cost | ONNX | analyze / forward | note: first failure, else the top reason MACs are not prunable |",
        "|---|---|---:|---:|---|---|---|---|---:|---|",
    ]
    for r in rows:
        ratio = f"{r['analyze_s'] / r['forward_s']:.1f}x ({r['analyze_s']:.2f} s)" \
            if "analyze_s" in r and "forward_s" in r else ""
        macs = mark(r.get("macs_ok"))
        if r.get("macs_ok") is False:
            macs += f" ({100 * r['macs_rel']:+.2f}%)"
        note = r.get("note") or (r.get("why") or "")
        lines.append(
            f"| {r['model']} | {r['source']} | "
            f"{r.get('groups', '')} ({r.get('prunable', '')}) | "
            f"{share_text(r)} | "
            f"{macs} | {mark(r.get('slim_ok'))} | {mark(r.get('params_ok'))} | "
            f"{mark(r.get('onnx_ok'))} | {ratio} | {note.replace('|', '/')[:160]} |")
    good = [r for r in rows if r.get("share", 0) > 0.9 and r.get("slim_ok") and
            r.get("params_ok") and r.get("onnx_ok")]
    lines += ["", f"{len(good)} of {len(rows)} models: prunable share above 90% and all three "
              "checks passed; "
              f"{sum(1 for r in rows if r.get('macs_ok') is False)} report MACs that the real "
              "count contradicts."]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
