"""Per-channel gates on the original architecture, for methods that learn or probe channels.

`gated(graph, gates)` runs the traced model with each group's channels multiplied by a gate
vector where they are produced: after the norm layer that directly follows a conv or linear
layer (BN rescales away anything placed before it), else right after the producer. A group
produced in several places (a residual stage) gets the same gate at each of them, which
equals gating their sum. Gates are callables returning a `(size,)` tensor, or a `(batch, size)`
one (a gate per sample: variational dropout's per-sample noise), drawn once per forward pass
(so a sampled noise is shared by every producer of the group); gradients flow to them, and
the gradient of the loss at a gate of ones is the per-channel response sum(a * dL/da).
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

import numpy as np
import torch
import torch.fx as fx
from torch import nn

from graphsearch.graph import ChannelGraph


def gate_points(graph: ChannelGraph) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """fx node -> (group of every output position, index in group) where gates apply."""
    return graph.gate_sites()


class GatedModel(nn.Module):
    """The traced original with per-group gates; shares the original's parameters."""

    def __init__(self, graph: ChannelGraph, gates: Mapping[int, Callable[[], torch.Tensor]],
                 owner: nn.Module | None = None):
        super().__init__()
        self.gm = graph.module
        self.owner = owner  # the module holding the gates' parameters, trained with the model
        self.gates = dict(gates)
        self._points = {}
        for node, (groups, index) in graph.gate_sites().items():
            if any(int(g) in self.gates for g in np.unique(groups)):
                self._points[node] = (torch.from_numpy(groups), torch.from_numpy(index))

    def forward(self, *args):
        values = {gid: fn() for gid, fn in self.gates.items()}
        return GateInterpreter(self.gm, self._points, values).run(*args)


class GateInterpreter(fx.Interpreter):
    def __init__(self, gm, points, values) -> None:
        super().__init__(gm)
        self.points = points
        self.values = values

    def run_node(self, n: fx.Node) -> Any:
        out = super().run_node(n)
        point = self.points.get(n.name)
        if point is None or not isinstance(out, torch.Tensor):
            return out
        groups, index = point
        factor = torch.ones(groups.shape, dtype=out.dtype, device=out.device)
        for gid, vec in self.values.items():
            hit = groups == gid
            if bool(hit.any()):
                vec = vec.to(out.dtype)
                if vec.dim() == 2 and index.shape[0] == 1:  # one gate vector per sample
                    v = vec[:, index[0].clamp_min(0)]
                else:
                    v = vec[index.clamp_min(0)]
                factor = torch.where(hit.to(out.device), v, factor)
        return out * factor


def gated(graph: ChannelGraph, gates: Mapping[int, Callable[[], torch.Tensor]],
          owner: nn.Module | None = None) -> GatedModel:
    """The traced model with every gated group's channels multiplied by `gates[g]()` at its
    gate sites (`ChannelGraph.gate_sites`); shares the graph's parameters, and `owner`'s (the
    module holding the gates) train with it."""
    return GatedModel(graph, gates, owner)


def fold_gates(graph: ChannelGraph, model: nn.Module, values: dict) -> list[str]:
    """Multiply, in place, the parameters of `model` (the graph's architecture) that sit at
    each gate site by the constant gate `values[g]` (a tensor over group g's channels): a
    norm's gamma and beta where the gate follows a norm, else the producer's output rows and
    bias. Returns the gate sites that hold no parameter to fold into (e.g. a norm without
    affine); empty when the folding is exact."""
    tied = graph.tied_parameters()
    params = dict(model.named_parameters())
    factors: dict[tuple[str, int], torch.Tensor] = {}
    unfolded = []
    for node, (groups, _) in graph.gate_sites().items():
        hit = [int(g) for g in np.unique(groups) if int(g) in values]
        if not hit:
            continue
        at = {name for name, b in graph.bindings.items()
              if node in b.nodes and not b.is_buffer and name in params}
        found = False
        for gid in hit:
            vec = values[gid].detach()
            for s in tied[gid]:
                if s.name not in at or s.is_buffer or s.role not in ("out", "gamma", "beta"):
                    continue
                p = params[s.name]
                if (s.name, s.dim) not in factors:
                    factors[(s.name, s.dim)] = torch.ones(p.shape[s.dim], dtype=p.dtype,
                                                          device=p.device)
                factors[(s.name, s.dim)][torch.as_tensor(s.positions, device=p.device)] = \
                    vec.to(p.device, p.dtype)[torch.as_tensor(s.channels, device=p.device)]
                found = True
        if not found:
            unfolded.append(node)
    with torch.no_grad():
        for (name, dim), f in factors.items():
            shape = [1] * params[name].dim()
            shape[dim] = -1
            params[name].mul_(f.view(shape))
    return unfolded


__all__ = ["gated", "fold_gates", "GatedModel", "GateInterpreter", "gate_points"]
