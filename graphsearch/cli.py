"""The command line: `graphsearch inspect | ...`.

Every user-facing problem is a `UserError`, printed as one line on stderr with exit status 2;
a traceback means a bug in graphsearch.
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings

from .load import UserError, load_model

DEFAULT_MODEL = "zoo:resnet32"


def human(n: float) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.3f} {unit}"
    return f"{n:g}"


def _inspect(args) -> int:
    from .analysis import analyze
    from .trace import TraceFailure

    loaded = load_model(args.model, args.weights)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            graph = analyze(loaded.model, loaded.example_inputs)
        except TraceFailure as exc:
            raise UserError(str(exc)) from exc
    notes = loaded.notes + [str(w.message) for w in caught
                            if str(w.message).startswith("graphsearch")]
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
    if s["shape_mode"] != "meta":
        print("shapes     from one real forward pass (some op has no meta kernel)")
    return 0


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
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.run(args)
    except UserError as exc:
        print(f"graphsearch: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("graphsearch: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
