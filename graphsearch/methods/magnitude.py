"""`magnitude`: rank channels globally by the L2 norm of everything tied to them.

A channel's norm covers its producers' output rows, its norm layers' gamma and beta and its
consumers' input columns. `normalise` puts groups of different fan-in on one scale:
- `mean` (default): norms divided by their group's mean (raw norms would always prune the
  widest layers first);
- `flops`: that, divided again by what one channel of the group costs in FLOPs relative to
  the mean over groups (a channel of a high-resolution layer must be worth more to stay;
  FLOPs are bilinear in the widths, so the cost is the baseline's marginal cost of one
  channel);
- `none`: raw norms.
`--set normalise=true/false` (older runs) read as `mean`/`none`.
"""

from __future__ import annotations

import numpy as np
import torch

from ..load import UserError
from .base import Method, Proposal, SearchContext

NORMALISE = ("mean", "flops", "none")


def channel_flops(graph) -> dict[int, float]:
    """Per prunable group: the baseline FLOPs saved by removing one of its channels."""
    full = graph.baseline.flops
    out = {}
    for g in graph.prunable_groups:
        if g.size > 1:
            out[g.id] = max(full - graph.cost({g.id: g.size - 1}).flops, 0.0)
    return out


class Magnitude(Method):
    name = "magnitude"
    summary = ("global ranking of channels by the L2 norm of everything tied to them "
               "(normalised per group)")
    cost = "no search: one pass over the weights, then the fine-tuning"
    trains = False
    defaults = {"normalise": "mean"}

    def search(self, ctx: SearchContext) -> Proposal:
        scores, how = self.scores(ctx)
        plan = ctx.land(scores)
        return Proposal(plan, ctx.model.state_dict(), {"normalise": how})

    def scores(self, ctx: SearchContext) -> tuple[dict[int, np.ndarray], str]:
        """Per prunable group, its channels' scores (higher: kept first), and the
        normalisation used."""
        how = ctx.settings.get("normalise", "mean")
        how = {True: "mean", False: "none"}.get(how, how)
        if how not in NORMALISE:
            raise UserError(f"magnitude: normalise={how!r}: choose one of "
                            f"{', '.join(NORMALISE)}")
        with torch.no_grad():
            norms = ctx.channel_norms()
        cost = channel_flops(ctx.graph) if how == "flops" else {}
        mean_cost = float(np.mean([c for c in cost.values() if c > 0])) if cost else 1.0
        scores = {}
        for gid, n in norms.items():
            n = n.double()
            if how in ("mean", "flops"):
                n = n / n.mean().clamp_min(1e-12)
            if how == "flops" and cost.get(gid, 0) > 0:
                n = n * (mean_cost / cost[gid])
            scores[gid] = n.cpu().numpy()
        return scores, how
