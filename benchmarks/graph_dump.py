"""Dump everything the analysis found for every zoo and coverage model to one JSON file, to
compare two versions of the code bit for bit (a refactoring must leave it unchanged):

    python benchmarks/graph_dump.py /tmp/before.json        # on the old code
    python benchmarks/graph_dump.py /tmp/after.json         # on the new code
    python benchmarks/graph_dump.py --compare /tmp/before.json /tmp/after.json

Per model: the summary, the groups, every node's rule / edge / dead-input meaning / inputs /
channel ids, the parameter bindings, the cost model (baseline, a half plan by counts and by
indices, every removable group at width 0, its removal), the MAC terms channel by channel,
the tied parameters, the gate sites and the MAC share. Floats are written exactly (repr).
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))


def _ids(x):
    if isinstance(x, torch.Tensor):
        return {"shape": list(x.shape), "ids": x.reshape(-1).tolist()}
    if isinstance(x, (tuple, list)):
        return [_ids(i) for i in x]
    return None if x is None else repr(x)


def _arr(a):
    return np.asarray(a).tolist()


def dump_graph(g) -> dict:
    from graphsearch.errors import PlanError

    half_counts = {grp.id: max(grp.min_width, grp.size // 2) for grp in g.prunable_groups}
    rng = random.Random(0)
    half_idx = {grp.id: sorted(rng.sample(range(grp.size), max(grp.min_width, grp.size // 2)))
                for grp in g.prunable_groups}
    zeroed = {}
    for grp in g.groups:
        if grp.prunable and grp.removable:
            try:
                r = g.removal({grp.id: 0})
            except PlanError as exc:  # removable alone, yet refused (reported as found)
                zeroed[grp.id] = {"refused": str(exc)}
                continue
            zeroed[grp.id] = {"cost": g.cost({grp.id: 0}).as_dict(), "dead": sorted(r.dead),
                              "zero_groups": sorted(r.zero_groups),
                              "dropped": None if r.dropped is None else _arr(r.dropped)}
    nodes = [{"name": i.name, "rule": i.rule, "edge": i.edge,
              "dead": getattr(i.dead, "name", i.dead), "inputs": list(i.inputs),
              "ids": _ids(i.ids)} for i in g.nodes]
    bindings = {name: {"buffer": b.is_buffer, "dims": {str(d): _arr(v) for d, v in b.dims.items()},
                       "roles": {str(d): r for d, r in b.roles.items()}, "ids": _ids(b.ids),
                       "nodes": list(b.nodes)} for name, b in g.bindings.items()}
    terms = [{"coeff": t.coeff, "nodes": list(t.nodes),
              "layouts": [[lay.const, _arr(lay.groups), _arr(lay.index), _arr(lay.mult)]
                          for lay in t.layouts]} for t in g.mac_terms()]
    tied = {str(gid): [[s.name, s.dim, _arr(s.positions), _arr(s.channels), s.role, s.is_buffer]
                       for s in slices] for gid, slices in g.tied_parameters().items()}
    gates = {k: [_arr(a), _arr(b)] for k, (a, b) in g.gate_sites().items()}
    return {
        "graph": g.to_dict(), "nodes": nodes, "bindings": bindings,
        "cost": {"baseline": g.baseline.as_dict(), "full": g.cost().as_dict(),
                 "half_counts": g.cost(half_counts).as_dict(),
                 "half_indices": g.cost(half_idx).as_dict(), "zeroed": zeroed},
        "mac_terms": terms, "tied": tied, "gate_sites": gates, "mac_share": g.mac_share(),
        "nx": sorted((u, v, d["kind"]) for u, v, d in g.nx.edges(data=True)),
    }


def models():
    from graphsearch import zoo
    import coverage_models as cm

    for name in zoo.MODELS:
        yield f"zoo/{name}", (lambda n=name: (zoo.build(n), zoo.example_inputs(n)))
    for name, (make, inputs) in cm.MODELS.items():
        yield f"coverage/{name}", (lambda m=make, i=inputs: (m().eval(), i()))


def main(argv: list[str]) -> int:
    if argv[:1] == ["--compare"]:
        a, b = (json.loads(Path(p).read_text()) for p in argv[1:3])
        bad = [(m, k) for m in sorted(set(a) | set(b)) for k in sorted(set(a.get(m, {})) |
               set(b.get(m, {}))) if a.get(m, {}).get(k) != b.get(m, {}).get(k)]
        for m, k in bad:
            print(f"DIFFERENT: {m} {k}")
        print(f"{len(a)} models, {sum(len(v) for v in a.values())} sections compared: "
              f"{'identical' if not bad else f'{len(bad)} differ'}")
        return 1 if bad else 0
    import warnings

    from graphsearch import analyze

    out = {}
    for name, build in models():
        torch.manual_seed(0)
        model, inputs = build()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            out[name] = dump_graph(analyze(model, inputs))
        print(name, out[name]["graph"]["summary"]["macs"], flush=True)
    Path(argv[0]).write_text(json.dumps(out, sort_keys=True))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
