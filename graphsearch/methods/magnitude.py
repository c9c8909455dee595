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

`schedule` says how the normalised scores become a plan:
- `one-shot`: one global cut in the scores as normalised on the whole model;
- `iterative`: Torch-Pruning's iterative global pruning in the limit of small steps. Blocks of
  `--round-to` channels are removed one at a time, always from the group whose weakest
  remaining channel scores lowest, and after each removal that group's scores are normalised
  again over the channels it has left (its mean rises, so a group that starts to lose
  channels keeps losing them, as in the peer); no group goes under its smallest nonzero width
  (the peer never removes a whole branch). The removal order is what the target step cuts.
  `max_ratio` (Torch-Pruning's `max_pruning_ratio`, 1.0 by default): the largest share of a
  group the schedule removes. At a multiple of 1 the runaway reaches one channel: on CIFAR
  ResNet-20 at 1/3 FLOPs the first stage kept 1-2 channels and ended 4 points under the
  default multiple of 8, whose smallest width stops it at 8 (`cifar10_table.md`, seventh
  session, with the measured effect of `--set max_ratio=0.5` there).
"""

from __future__ import annotations

import numpy as np
import torch

from ..target import allowed_widths
from .base import Method, Proposal, SearchContext
from .common import MAX_RATIO, channel_savings

NORMALISE = ("mean", "flops", "none")
SCHEDULES = ("one-shot", "iterative")


def channel_flops(graph) -> dict[int, float]:
    """Per prunable group: the baseline FLOPs saved by removing one of its channels."""
    return channel_savings(graph, "flops")


class Magnitude(Method):
    name = "magnitude"
    summary = ("global ranking of channels by the L2 norm of everything tied to them "
               "(normalised per group)")
    cost = "no search: one pass over the weights, then the fine-tuning"
    trains = False
    defaults = {"normalise": "mean", "schedule": "iterative", "max_ratio": 1.0}
    choices = {"normalise": NORMALISE + ("true", "false"), "schedule": SCHEDULES}
    bounds = {"max_ratio": MAX_RATIO}

    def search(self, ctx: SearchContext) -> Proposal:
        s = self.settings_of(ctx)
        scores, how = self.scores(ctx)
        schedule, max_ratio = str(s["schedule"]).lower(), float(s["max_ratio"])
        if schedule == "iterative":
            scores = removal_order(ctx.graph, scores, ctx.round_to,
                                   renormalise=how in ("mean", "flops"),
                                   max_ratio=max_ratio)
        plan = ctx.land(scores)
        return Proposal(plan, ctx.model.state_dict(), {"normalise": how, "schedule": schedule,
                                                       "max_ratio": max_ratio})

    def scores(self, ctx: SearchContext) -> tuple[dict[int, np.ndarray], str]:
        """Per prunable group, its channels' scores (higher: kept first), and the
        normalisation used."""
        how = str(self.settings_of(ctx)["normalise"]).lower()
        how = {"true": "mean", "false": "none"}.get(how, how)
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


def removal_order(graph, scores: dict[int, np.ndarray], round_to: int,
                  renormalise: bool = True, max_ratio: float = 1.0) -> dict[int, np.ndarray]:
    """Scores that put channels in the order iterative global pruning removes them (module
    docstring, `iterative`): a channel removed at step t scores t plus a fraction below 1
    (its score then, squashed into [0, 1)), one never removed scores the step count plus 1
    plus that fraction. `scores` are normalised per group (by its mean) when given;
    with `renormalise` each group is normalised again over its remaining channels after
    each of its removals."""
    step = max(int(round_to), 1)
    raw = {gid: np.asarray(s, dtype=float) for gid, s in scores.items()}
    # each group's scale as given (mean 1 when normalised), so the `flops` factor survives
    scale = {gid: float(s.mean()) if len(s) else 1.0 for gid, s in raw.items()}
    alive = {gid: np.ones(len(s), dtype=bool) for gid, s in raw.items()}
    floor = {}
    for g in graph.prunable_groups:
        if g.id in raw:
            nonzero = [w for w in allowed_widths(g.size, g.min_width, step) if w > 0]
            floor[g.id] = nonzero[0] if nonzero else g.size
            floor[g.id] = max(floor[g.id], int(np.ceil((1.0 - max_ratio) * g.size)))

    def current(gid: int) -> np.ndarray:
        s = raw[gid]
        if not renormalise:
            return s
        mean = float(s[alive[gid]].mean()) if alive[gid].any() else 1.0
        return s * (scale[gid] / max(mean, 1e-12))

    removed_at = {gid: np.zeros(len(s)) for gid, s in raw.items()}
    frac = {gid: np.zeros(len(s)) for gid, s in raw.items()}
    t = 0
    while True:
        best = None
        for gid in raw:
            idx = np.flatnonzero(alive[gid])
            n_left = len(idx)
            # the next allowed width below the current one, not under the floor
            target = (n_left - 1) // step * step
            if target < floor.get(gid, n_left):
                continue
            s = current(gid)[idx]
            weakest = float(s.min())
            if best is None or weakest < best[0]:
                best = (weakest, gid, idx[np.argsort(s, kind="stable")[:n_left - target]])
        if best is None:
            break
        t += 1
        _, gid, block = best
        now = current(gid)
        removed_at[gid][block] = t
        frac[gid][block] = squash(now[block])
        alive[gid][block] = False
    out = {}
    for gid in raw:
        last = current(gid)
        left = alive[gid]
        out[gid] = np.where(left, t + 1 + squash(last), removed_at[gid] + frac[gid])
    return out


def squash(s: np.ndarray) -> np.ndarray:
    """A score (>= 0) mapped into [0, 1), order kept."""
    s = np.maximum(np.asarray(s, dtype=float), 0.0)
    return s / (1.0 + s)
