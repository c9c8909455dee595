"""`magnitude`: rank channels globally by the L2 norm of everything tied to them.

A channel's norm covers its producers' output rows, its norm layers' gamma and beta and its
consumers' input columns. Norms are divided by their group's mean so that layers of different
fan-in compete on one scale (raw norms would always prune the widest layers first).
"""

from __future__ import annotations

import torch

from .base import Method, Proposal, SearchContext


class Magnitude(Method):
    name = "magnitude"
    summary = ("global ranking of channels by the L2 norm of everything tied to them "
               "(normalised per group)")
    cost = "no search: one pass over the weights, then the fine-tuning"
    trains = False
    defaults = {"normalise": True}

    def search(self, ctx: SearchContext) -> Proposal:
        with torch.no_grad():
            norms = ctx.channel_norms()
        scores = {}
        for gid, n in norms.items():
            n = n.double()
            if ctx.settings.get("normalise", True):
                n = n / n.mean().clamp_min(1e-12)
            scores[gid] = n.cpu().numpy()
        plan = ctx.land(scores)
        return Proposal(plan, ctx.model.state_dict(), {})
