"""Probes: something measured on each trained candidate, in the worker that trained it.

gensynth asks, besides each child's score, how strongly each of its channels responds on a
fixed set of images (`GateResponses`); the probe runs where the candidate was trained, so
its trained weights need not travel back for it. A probe's digest goes into the
evaluation's key (it changes the result).
"""

from __future__ import annotations

import hashlib
from typing import Callable, Mapping, Sequence

import numpy as np
import torch
from torch import nn

from ..graph import ChannelGraph, PlanError
from .candidate import canonical_keep, weights_digest


class Probe:
    """Something measured on each trained candidate, in the worker that trained it.

    `digest()`: a string naming the probe and everything that changes what it returns (it
    goes into the cache key); `bind(graph, keep)`: called in the search's process for each
    candidate, returns a picklable callable `f(module) -> result` that the worker calls on the
    trained slim module (in eval mode; it must leave the weights as they are). The result must
    be picklable (it is cached with `torch.save`)."""

    def digest(self) -> str:
        raise NotImplementedError

    def bind(self, graph: ChannelGraph, keep: Mapping) -> Callable[[nn.Module], object]:
        raise NotImplementedError


class GateResponses(Probe):
    """Per prunable group, the mean over `stimuli` (a sequence of (images, labels) batches)
    of |dL/dgate_c|, L the cross-entropy summed over a stimulus and divided by its size, with
    a gate of ones on every channel at its gate sites (`ChannelGraph.gate_sites`): at a kept
    channel that is |sum(a_c * dL/da_c)|, the channel's response; 0 at a dropped channel.
    Returns {group id: float64 array of the group's full size}."""

    VERSION = 1

    def __init__(self, stimuli: Sequence, chunk: int = 256):
        self.stimuli = [(torch.as_tensor(x), torch.as_tensor(y).long()) for x, y in stimuli]
        self.chunk = int(chunk)

    def digest(self) -> str:
        h = hashlib.sha256(f"gate-responses:{self.VERSION}:{self.chunk}".encode())
        for x, y in self.stimuli:
            h.update(weights_digest({"x": x, "y": y}).encode())
        return h.hexdigest()[:32]

    def bind(self, graph: ChannelGraph, keep: Mapping) -> "_BoundGateResponses":
        from graphsearch.passes.plan import resolve

        plan = resolve(graph, canonical_keep(keep))
        infos = {i.name: i for i in graph.nodes}
        sizes = {g.id: g.size for g in graph.prunable_groups}
        points = {}
        for node, (groups, index) in graph.gate_sites().items():
            if node in plan.dead or not any(int(g) in sizes for g in np.unique(groups)):
                continue
            ids = infos[node].ids
            sel = plan.selection(ids, tuple(ids.shape))
            if sel is None:
                raise PlanError(f"gate site '{node}': the kept channels are no regular slice")
            for d, idx in enumerate(sel):
                if idx is not None:
                    groups, index = np.take(groups, idx, axis=d), np.take(index, idx, axis=d)
            points[node] = (torch.from_numpy(np.ascontiguousarray(groups)),
                            torch.from_numpy(np.ascontiguousarray(index)))
        return _BoundGateResponses(points, sizes, self.stimuli, self.chunk)


class _BoundGateResponses:
    """`GateResponses` for one candidate: the gate sites of its slim model."""

    def __init__(self, points, sizes, stimuli, chunk):
        self.points, self.sizes, self.stimuli, self.chunk = points, sizes, stimuli, chunk

    def __call__(self, module: nn.Module) -> dict[int, np.ndarray]:
        from graphsearch.passes.gates import GateInterpreter

        names = {n.name for n in module.graph.nodes}
        missing = sorted(set(self.points) - names)
        if missing:
            raise RuntimeError(f"gate responses: the slim model lost gate sites {missing}")
        gates = {gid: torch.ones(n, requires_grad=True) for gid, n in self.sizes.items()}
        acc = {gid: torch.zeros(n) for gid, n in self.sizes.items()}
        was = module.training
        module.eval()
        try:
            for x, y in self.stimuli:
                grads = {gid: torch.zeros(n) for gid, n in self.sizes.items()}
                for xb, yb in zip(x.split(self.chunk), y.split(self.chunk)):
                    out = GateInterpreter(module, self.points, gates).run(xb)
                    out = out[0] if isinstance(out, (tuple, list)) else out
                    loss = nn.functional.cross_entropy(out, yb, reduction="sum") / len(y)
                    got = torch.autograd.grad(loss, list(gates.values()), allow_unused=True)
                    for gid, g in zip(gates, got):
                        if g is not None:
                            grads[gid] += g.detach()
                for gid in gates:
                    acc[gid] += grads[gid].abs()
        finally:
            module.train(was)
        n = max(1, len(self.stimuli))
        return {gid: (a / n).double().numpy() for gid, a in acc.items()}

