"""The command line: `graphsearch inspect | ...`.

Every user-facing problem is a `UserError`, printed as one line on stderr with exit status 2;
a traceback means a bug in graphsearch.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import signal
import sys
import threading
import warnings
from pathlib import Path

from . import optimize as pipeline  # its `optimize` looked up at call time (tests stand in)
from .graph_cache import analyze_cached
from .checkpoint import is_main, write_atomic
from .errors import PlanError, TraceFailure
from .load import UserError, load_model
from .optimize import OptimizeConfig, value_reads_error
from .passes.export import export_onnx
from .passes.latency import latency_pair
from .passes.save import save_portable
from .passes.slim import slim
from .train import RECIPES
from .units import human

DEFAULT_MODEL = "zoo:resnet32"
DEFAULT_OPTIMIZE_MODEL = "examples/cifar_resnet20.py"


def _inspect(args) -> int:

    loaded = load_model(args.model, args.weights)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            graph, _ = analyze_cached(loaded.model, loaded.example_inputs, rules=loaded.rules)
        except TraceFailure as exc:
            raise UserError(str(exc)) from exc
    notes = loaded.notes + [str(w.message) for w in caught
                            if str(w.message).startswith("graphsearch")]
    for who in sorted(set(graph.value_reads.values())):
        notes.append(f"{who} reads tensor values (item(), int(), float(), bool() or "
                     "an `if` on a tensor): shapes come from one real forward pass; "
                     "`optimize` checks first that such a model still exports to ONNX and "
                     ".pt2 (write data-dependent code with tensor ops, e.g. torch.where)")
    if args.json:
        out = graph.to_dict()
        out["model"] = loaded.source
        out["notes"] = notes
        print(json.dumps(out, indent=2))
        return 0
    for n in notes:
        print(f"note: {n}", file=sys.stderr)
    print(format_groups(graph, all_members=args.all_members))
    s = graph.summary()
    print()
    print(f"model      {loaded.source}")
    print(f"MACs       {human(s['macs'])}  ({s['macs']:,})")
    print(f"FLOPs      {human(s['flops'])}  (2 x MACs of conv, linear, matmul)")
    print(f"params     {human(s['params'])}  ({s['params']:,})")
    print(f"groups     {s['groups']} ({s['prunable']} prunable, {s['removable']} may reach "
          f"width 0, {s['prunable_channels']:,} prunable channels)")
    print(format_share(graph))
    if s["shape_mode"] != "meta":
        print("shapes     from one real forward pass (some op has no meta kernel or reads "
              "tensor values)")
    return 0


def format_share(graph, width: int = 100) -> str:
    """The share of MACs a plan can change, and the top reasons for the rest."""
    share = graph.mac_share()
    lines = [f"prunable   {100 * share['share']:.1f}% of MACs "
             f"({human(share['prunable_macs'])} of {human(share['macs'])})"]
    total = max(share["macs"], 1)
    for reason, macs in share["reasons"]:
        text = f"  {100 * macs / total:5.1f}% not prunable: {reason}"
        lines.append(text if len(text) <= width else text[:width - 3] + "...")
    if share["more_reasons"]:
        lines.append(f"  ... and {share['more_reasons']} more reasons (--json lists groups)")
    return "\n".join(lines)


def format_groups(graph, all_members: bool = False, width: int = 100) -> str:
    rows = [f"{'id':>4}  {'size':>5}  {'prunable':<8}  members / why not"]
    for g in graph.groups:
        status = ("yes, >=0" if g.removable else "yes") if g.prunable else "no"
        # Weights first: they say where a group lives better than norm statistics do.
        ordered = sorted(g.members, key=lambda m: "[" not in m)
        members = ordered if all_members or len(ordered) <= 4 else \
            ordered[:4] + [f"+{len(ordered) - 4} more"]
        text = ", ".join(members)
        if not g.prunable:
            text = f"{g.reason}  [{text}]"
        if not all_members and len(text) > width:
            text = text[: width - 3] + "..."
        rows.append(f"{g.id:>4}  {g.size:>5}  {status:<8}  {text}")
    return "\n".join(rows)


def _parse_settings(items: list[str]) -> dict:
    out = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise UserError(f"--set {item!r}: write KEY=VALUE, e.g. --set lambda=3e-3")
        try:
            out[key.strip()] = json.loads(value)
        except json.JSONDecodeError:
            out[key.strip()] = value
    return out


def _optimize(args) -> int:
    settings = _parse_settings(args.set)  # checked against the method's in `prepare`
    for flag, value in (("--val-fraction", args.val_fraction),
                        ("--test-fraction", args.test_fraction)):
        if not 0.0 <= value < 1.0:
            raise UserError(f"{flag} {value}: give a fraction in [0, 1), e.g. 0.1")
    config = OptimizeConfig(
        model=args.model, method=args.method, weights=args.weights, data=args.data,
        val_data=args.val_data, test_data=args.test_data,
        flops=args.flops, params=args.params, latency=args.latency,
        round_to=_round_to(args.round_to),
        out=args.out, seed=args.seed, baseline_epochs=args.baseline_epochs,
        search_epochs=args.search_epochs, finetune_epochs=args.finetune_epochs, lr=args.lr,
        finetune_lr=args.finetune_lr, batch_size=args.batch_size,
        finetune_recipe=args.finetune_recipe, distill=args.distill,
        val_fraction=args.val_fraction, test_fraction=args.test_fraction,
        threads=args.threads, latency_batch=args.latency_batch, max_train=args.max_train,
        workers=args.workers, ray=args.ray, shared_data=args.shared_data,
        settings=settings, progress=not args.quiet)
    log = (lambda *_: None) if args.quiet else (lambda msg: print(msg, file=sys.stderr))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        report = pipeline.optimize(config, resume=args.resume, log=log)

    if not is_main():
        return 0  # under torchrun rank 0 speaks for all
    b, r = report["baseline"], report["result"]

    def pct(v):
        return "   n/a " if v is None else f"{v * 100:6.2f}%"

    for name, x in (("baseline", b), (args.method, r)):
        print(f"{name:<9} test {pct(x.get('test_accuracy'))}  val {pct(x['accuracy'])}  "
              f"{x['flops'] / 1e6:9.2f} MFLOPs  {x['params']:>11,} params  "
              f"{x['latency_ms']:.3f} ms")
    for w in (report.get("split_check", {}).get("warnings", [])
              + report.get("latency", {}).get("warnings", [])):
        print(f"warning: {w}", file=sys.stderr)
    print(f"report: {Path(args.out) / 'report.md'}")
    for line in report.get("failed_targets", []):
        print(f"graphsearch: FAILED TARGET: {line}", file=sys.stderr)
    return 1 if report.get("failed_targets") else 0


def _round_to(text: str):
    """`--round-to`: 'auto' or a positive channel multiple."""
    if str(text).strip().lower() == "auto":
        return "auto"
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise UserError(f"--round-to {text}: give a positive channel multiple (8; 1 for any "
                        "width) or 'auto'")
    return value


def _export(args) -> int:


    loaded = load_model(args.model, args.weights)
    try:
        plan_json = json.loads(Path(args.keep).read_text())
    except FileNotFoundError:
        raise UserError(f"plan file '{args.keep}' does not exist") from None
    except json.JSONDecodeError as exc:
        raise UserError(f"plan file '{args.keep}' is not JSON: {exc}") from None
    keep_raw = plan_json.get("keep", plan_json) if isinstance(plan_json, dict) else None
    if not isinstance(keep_raw, dict):
        raise UserError(f"'{args.keep}' must map group ids to kept channel indices "
                        '(e.g. {"3": [0, 1, 5]}) or hold such a map under "keep"')
    try:
        keep = {int(g): [int(i) for i in v] for g, v in keep_raw.items()}
    except (TypeError, ValueError):
        raise UserError(f"'{args.keep}': group ids and channel indices must be integers") \
            from None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            graph, _ = analyze_cached(loaded.model, loaded.example_inputs, rules=loaded.rules)
        except TraceFailure as exc:
            raise UserError(str(exc)) from exc
        made_for = plan_json.get("baseline", {}) if isinstance(plan_json, dict) else {}
        if isinstance(made_for, dict) and {"macs", "params"} <= set(made_for) and (
                made_for["macs"], made_for["params"]) != (graph.baseline.macs,
                                                          graph.baseline.params):
            # a report.json of another model: its group ids mean other channels here
            raise UserError(
                f"plan '{args.keep}' was made for {plan_json.get('model', 'another model')} "
                f"({made_for['macs']:,} MACs, {made_for['params']:,} params); {args.model} has "
                f"{graph.baseline.macs:,} MACs and {graph.baseline.params:,} params: export "
                "it with the model (and example inputs) the run used")
        try:
            module = slim(graph, keep)
        except PlanError as exc:
            raise UserError(f"plan '{args.keep}': {exc}") from None
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        x = loaded.example_inputs
        try:
            export_onnx(module, x, out / "model.onnx")
            save_portable(module, x, out / "model.pt2")
            export_onnx(loaded.model.eval(), x, out / "baseline.onnx")
        except Exception as exc:  # noqa: BLE001 - a model that reads tensor values: say so
            if not graph.value_reads:
                raise
            raise value_reads_error(graph, exc) from exc
        # interleaved (before, after, before, ...): both under the same load
        before, after, ratio = latency_pair(out / "baseline.onnx", out / "model.onnx",
                                            threads=args.threads)
    b, c = graph.baseline, graph.cost(keep)
    pair = after.pair
    lines = ["| | MACs | params | latency (ms) |", "|---|---|---|---|",
             f"| before | {b.macs:,} | {b.params:,} | {before.median_ms:.3f} |",
             f"| after | {c.macs:,} | {c.params:,} | {after.median_ms:.3f} |",
             f"| ratio | {c.macs / b.macs:.3f} | {c.params / b.params:.3f} | "
             f"{ratio:.3f} (p10-p90 {pair['ratio_p10']:.3f}-{pair['ratio_p90']:.3f}) |", "",
             f"latency: {after}; timed interleaved with the baseline, load "
             + ("n/a" if after.load_per_cpu is None else f"{after.load_per_cpu:.2f}")
             + " per CPU"]
    if pair["warning"]:
        lines += ["", f"**Warning:** {pair['warning']}"]
        print(f"warning: {pair['warning']}", file=sys.stderr)
    write_atomic(out / "report.md", "\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"wrote {out / 'model.onnx'}, {out / 'model.pt2'}, {out / 'report.md'}")
    return 0


def _on_off(text: str) -> bool:
    if text not in ("on", "off"):
        raise argparse.ArgumentTypeError(f"{text!r}: say on or off")
    return text == "on"


def _default(name: str):
    """The default of an `optimize` option: OptimizeConfig's, the one source."""

    return OptimizeConfig.__dataclass_fields__[name].default


def _setting(method, key: str) -> str:
    """A method's setting in --help: its default, and its choices or its range."""
    text = f"{key}={method.defaults[key]}"
    if key in method.choices:
        return f"{text} ({'|'.join(method.choices[key])})"
    return f"{text} {method.bounds[key]}" if key in method.bounds else text


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="graphsearch",
        description="Compact architecture search for PyTorch models on a channel-group IR.")
    sub = p.add_subparsers(dest="command", required=True)
    ins = sub.add_parser(
        "inspect", help="show the coupled channel groups and the cost of a model",
        description="Trace a model and print its channel groups (size, prunable or why not, "
                    "members) and its MACs, FLOPs and params.")
    ins.add_argument("model", nargs="?", default=DEFAULT_MODEL,
                     help=f"model.py (defines build_model(), example_inputs()) or zoo:NAME "
                          f"(default: {DEFAULT_MODEL})")
    ins.add_argument("--weights", help="a state dict to load into the model")
    ins.add_argument("--json", action="store_true", help="machine-readable output")
    ins.add_argument("--all-members", action="store_true", help="do not abbreviate members")
    ins.set_defaults(run=_inspect)

    from .methods import METHODS

    import textwrap

    method_help = "\n".join(
        textwrap.fill(f"{n}: {m.summary}. Costs: {m.cost}. Settings: "
                      + (", ".join(_setting(m, k) for k in m.defaults) or "none") + ".",
                      width=78, initial_indent="  ", subsequent_indent="      ")
        for n, m in METHODS.items())
    opt = sub.add_parser(
        "optimize", help="search a slimmer architecture under a budget, fine-tune, export",
        description="Find the slimmest architecture within the targets, fine-tune it, and "
                    "write model.onnx, model.pt2, report.json, report.md and tradeoff.png.",
        epilog="methods (set with --method; their settings with --set KEY=VALUE):\n"
               + method_help,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    opt.add_argument("model", nargs="?", default=DEFAULT_OPTIMIZE_MODEL,
                     help=f"model.py or zoo:NAME (default: {DEFAULT_OPTIMIZE_MODEL})")
    opt.add_argument("--method", default=_default("method"),
                     help=f"search method: {', '.join(METHODS)} (default: %(default)s)")
    opt.add_argument("--weights", help="trained weights (a state dict); without them the "
                                       "baseline is trained first")
    opt.add_argument("--data", help="training data: ImageFolder folder or .zip/.tar.gz, CIFAR "
                                    "pickle batches, or 'synthetic[:N[:K[:L]]]' (default: the "
                                    "built-in synthetic set)")
    opt.add_argument("--val-data", metavar="PATH",
                     help="validation data (same formats as --data), on which every decision "
                          "is made; default: --val-fraction of --data held out by --seed")
    opt.add_argument("--test-data", metavar="PATH",
                     help="test data (same formats as --data), only reported, measured once "
                          "at the end (e.g. the official test split); default: "
                          "--test-fraction of --data held out by --seed")
    opt.add_argument("--val-fraction", type=float, default=_default("val_fraction"),
                     help="share of each class of --data held out for validation when no "
                          "--val-data is given (default: %(default)s)")
    opt.add_argument("--test-fraction", type=float, default=_default("test_fraction"),
                     help="share of each class of --data held out for testing when no "
                          "--test-data is given; 0 reports no test accuracy "
                          "(default: %(default)s)")
    opt.add_argument("--flops", help="FLOPs target: a fraction of the baseline (0.33) or a "
                                     "count (46M); default 1/3 when no target is given")
    opt.add_argument("--params", help="params target: fraction (0.5) or count (200k)")
    opt.add_argument("--latency", help="onnxruntime latency target: '4ms' or a fraction")
    opt.add_argument("--round-to", default=_default("round_to"),
                     help="channel multiple (e.g. 8; 1: any width) or 'auto' (default: the "
                          "multiple onnxruntime runs fastest here, measured once per machine)")
    opt.add_argument("--out", default=_default("out"), help="output folder")
    opt.add_argument("--resume", action="store_true", help="continue an interrupted run")
    opt.add_argument("--seed", type=int, default=_default("seed"),
                     help="seed of the splits, the training order and the methods")
    opt.add_argument("--baseline-epochs", type=int, default=_default("baseline_epochs"),
                     help="epochs to train the baseline when no weights are given")
    opt.add_argument("--search-epochs", type=float, default=_default("search_epochs"),
                     help="training budget of the search, in epochs")
    opt.add_argument("--finetune-epochs", type=int, default=_default("finetune_epochs"))
    opt.add_argument("--lr", type=float, default=_default("lr"), help="baseline learning rate")
    opt.add_argument("--finetune-lr", type=float, default=_default("finetune_lr"),
                     help="learning rate of the search and fine-tuning")
    opt.add_argument("--finetune-recipe", choices=sorted(RECIPES),
                     default=_default("finetune_recipe"),
                     help="optimizer and schedule of the final fine-tune (default: "
                          "%(default)s; report.md describes it)")
    opt.add_argument("--distill", type=_on_off, metavar="on|off", default=_default("distill"),
                     help="the final fine-tune distils from the baseline's logits "
                          "(default: on; costs a forward pass of the baseline per step)")
    opt.add_argument("--batch-size", type=int, default=_default("batch_size"))
    opt.add_argument("--max-train", type=int, default=_default("max_train"), metavar="N",
                     help="train on N images of the training split drawn at random by "
                          "--seed (after the validation and test splits are held out; for "
                          "quick runs)")
    opt.add_argument("--threads", type=int, default=_default("threads"),
                     help="onnxruntime threads for latency")
    opt.add_argument("--latency-batch", type=int, default=_default("latency_batch"),
                     help="the report times batch 1 and this batch size (default: %(default)s)")
    opt.add_argument("--workers", type=int, default=_default("workers"),
                     help="candidate evaluations at once on this machine (gensynth, autoshrink, "
                          "submodular, esnac): worker processes of one torch thread each "
                          "(default: one per core; 1: in-process); same result for any count")
    opt.add_argument("--ray", metavar="auto|ADDRESS", default=_default("ray"),
                     help="evaluate candidates on a Ray cluster instead ('auto': the cluster "
                          "this machine joined; or HOST:PORT); needs pip install "
                          "'graphsearch[ray]'")
    opt.add_argument("--shared-data", metavar="DIR", default=_default("shared_data"),
                     help="decode --data once into DIR, a folder every worker and Ray node "
                          "sees, and let them memory-map it there instead of receiving "
                          "copies (default: done in the data cache when the decoded images "
                          "pass 2 GiB)")
    opt.add_argument("--set", action="append", metavar="KEY=VALUE",
                     help="a method setting, e.g. --set lambda=3e-3 (repeatable)")
    opt.add_argument("--quiet", action="store_true", help="no progress output")
    opt.set_defaults(run=_optimize)

    exp = sub.add_parser(
        "export", help="slim a model by a keep plan and write ONNX, .pt2 and a report",
        description="Apply a keep plan (JSON: group id -> kept channel indices, or a "
                    "report.json) and write model.onnx, model.pt2 and report.md.")
    exp.add_argument("model", help="model.py or zoo:NAME")
    exp.add_argument("--keep", required=True, help="plan JSON")
    exp.add_argument("--out", required=True, help="output folder")
    exp.add_argument("--weights", help="trained weights (a state dict)")
    exp.add_argument("--threads", type=int, default=1, help="onnxruntime threads for latency")
    exp.set_defaults(run=_export)
    return p


class Terminated(BaseException):
    """SIGTERM arrived: unwinds the run like Ctrl-C does (workers ended, the --out lock
    freed, finished stages kept), where Python's default would end the process at once."""


def _on_sigterm(signum, frame):
    raise Terminated()


REDELIVER_S = 0.05  # how soon a swallowed SIGTERM or Ctrl-C is sent again


def _redeliver_swallowed(unraisable, previous_hook) -> None:
    """An exception raised where Python cannot pass it on (a `__del__`, a weakref callback,
    the garbage collector) is printed and dropped. A signal handler runs wherever the main
    thread happens to be, so Terminated (or Ctrl-C's KeyboardInterrupt) can land in a
    finaliser and be lost, and the run goes on as if no signal came (seen: tqdm's `__del__`,
    the search then ran until killed). Such a signal is sent again to the main thread, a
    moment later, when it is out of the finaliser."""
    exc = unraisable.exc_value
    if isinstance(exc, (Terminated, KeyboardInterrupt)) and hasattr(signal, "pthread_kill"):
        signum = signal.SIGTERM if isinstance(exc, Terminated) else signal.SIGINT
        again = threading.Timer(REDELIVER_S, signal.pthread_kill,
                                (threading.main_thread().ident, signum))
        again.daemon = True
        again.start()
        return
    previous_hook(unraisable)


@contextlib.contextmanager
def _signals_unwind():
    """SIGTERM raises Terminated in the main thread (Ctrl-C raises KeyboardInterrupt there
    already), and neither is lost in a finaliser; both restored after."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _on_sigterm)
    previous_hook = sys.unraisablehook
    sys.unraisablehook = functools.partial(_redeliver_swallowed, previous_hook=previous_hook)
    try:
        yield
    finally:
        sys.unraisablehook = previous_hook
        signal.signal(signal.SIGTERM, previous)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    with _signals_unwind():
        try:
            code = args.run(args)
        except UserError as exc:
            if is_main():  # under torchrun every rank raises the same error: say it once
                print(f"graphsearch: error: {exc}", file=sys.stderr)
            code = 2
        except (KeyboardInterrupt, Terminated) as exc:
            what = "terminated (SIGTERM)" if isinstance(exc, Terminated) else "interrupted"
            hint = ("; finished stages are kept: continue with --resume"
                    if args.command == "optimize" else "")
            print(f"graphsearch: {what}{hint}", file=sys.stderr)
            return 143 if isinstance(exc, Terminated) else 130
    _leave_process_group()
    return code


def _leave_process_group() -> None:
    """Under torchrun: every rank leaves together (a rank tearing gloo down while another
    still works makes that one abort)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        try:
            dist.barrier()
        finally:
            dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
