"""A keep plan resolved against a channel graph: which position of every tensor survives.

`keep` maps group id to the kept channel indices of that group (groups not named keep all;
a group that may reach width 0 may keep none). Resolving it answers, for any channel-id
tensor recorded by the analysis, which of its positions are kept, and whether that kept set
is a *selection* (an independent choice of indices along each dim, so that slicing dims
one by one produces it) or not (an interleaving such as a channel shuffle of unequal halves).
Both passes (`slim`, `mask`) work from this one object, so they cannot disagree on a plan.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np
import torch

from graphsearch.graph import ChannelGraph, PlanError

Keep = Mapping[int, Sequence[int]]


@dataclass
class ResolvedPlan:
    graph: ChannelGraph
    keep: dict[int, np.ndarray]  # every group the plan changes, incl. implied zeros
    dead: frozenset  # fx node names removed with a branch
    _kept: np.ndarray  # per group offset + index: kept or not

    def kept(self, ids: torch.Tensor) -> torch.Tensor:
        """Bool tensor, the shape of `ids`: which positions survive (no atom: always)."""
        flat = np.asarray(ids.reshape(-1).numpy(), dtype=np.int64)
        groups, index = self.graph.locate(flat)
        out = np.ones(flat.shape, dtype=bool)
        has = groups >= 0
        out[has] = self._kept[self.graph.group_offset(groups[has]) + index[has]]
        return torch.from_numpy(out.reshape(tuple(ids.shape)))

    def changes(self, ids) -> bool:
        return isinstance(ids, torch.Tensor) and not bool(self.kept(ids).all())

    def selection(self, ids: torch.Tensor, shape: Sequence[int]) -> list[np.ndarray | None] | None:
        """Kept indices along each dim of a value of `shape` whose channel ids are `ids`
        (None for a dim that keeps everything), or None if the kept set is no selection."""
        mask = self.kept(ids)
        if bool(mask.all()):
            return [None] * len(shape)
        per_dim: list[np.ndarray | None] = []
        product = torch.ones_like(mask)
        for d in range(mask.dim()):
            if mask.size(d) == 1:
                per_dim.append(None)
                continue
            others = [k for k in range(mask.dim()) if k != d]
            along = mask.any(dim=others) if others else mask
            shape_d = [1] * mask.dim()
            shape_d[d] = -1
            product = product & along.reshape(shape_d)
            per_dim.append(None if bool(along.all()) else np.flatnonzero(along.numpy()))
        if not bool(torch.equal(product, mask)):
            return None
        return per_dim

    def slim_shape(self, ids: torch.Tensor, shape: Sequence[int]) -> tuple[int, ...] | None:
        sel = self.selection(ids, shape)
        if sel is None:
            return None
        return tuple(int(n) if s is None else len(s) for n, s in zip(shape, sel))


def resolve(graph: ChannelGraph, keep: Keep | None) -> ResolvedPlan:
    """Check `keep` against the graph and work out everything a pass needs from it."""
    keep = {int(g): np.asarray(sorted(int(i) for i in idx), dtype=np.int64)
            for g, idx in (keep or {}).items()}
    graph.check({g: list(idx) for g, idx in keep.items()})
    removal = graph.removal({g: list(idx) for g, idx in keep.items()})
    for gid in removal.zero_groups:
        keep[gid] = np.zeros(0, dtype=np.int64)
    kept = np.ones(graph.channel_count, dtype=bool)
    for gid, idx in keep.items():
        off, size = int(graph.group_offset(gid)), graph.groups[gid].size
        kept[off:off + size] = False
        kept[off + idx] = True
    if removal.dropped is not None:
        kept &= ~removal.dropped  # produced only inside removed branches
    return ResolvedPlan(graph, keep, removal.dead, kept)


def first_channels(graph: ChannelGraph, widths: Mapping[int, int]) -> dict[int, list[int]]:
    """A keep plan from widths: the first `w` channels of each group."""
    return {g: list(range(int(w))) for g, w in widths.items()}


__all__ = ["Keep", "ResolvedPlan", "resolve", "first_channels", "PlanError"]
