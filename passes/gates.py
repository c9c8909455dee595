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

from ..graph import ChannelGraph

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
        return _GateInterpreter(self.gm, self._points, values).run(*args)


class _GateInterpreter(fx.Interpreter):
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
    return GatedModel(graph, gates, owner)


__all__ = ["gated", "GatedModel", "gate_points"]
