"""`morphnet`: FLOP-regularised shrinking on norm-layer gammas, then one width multiplier
(Gordon et al. 2018; METHODS.md section 3).

Regulariser, over every MAC term of the cost model (a conv, linear or matmul op), with
`coeff = 2 * MACs per unit of width` (FLOPs):
    two layouts (in, out):  coeff * (A_in * sum r_out + A_out * sum r_in)
    one layout (depthwise / grouped conv, whose input channel c *is* output channel c):
                            coeff * (sum r_in + sum r_out) = 2 * coeff * sum r
where `r_c` is `|gamma_c|` of the norm layer after the producing op and `A` the alive count
(`|gamma| > threshold`, boolean, no gradient through it). On the channel-group IR a channel's
`r` combines every gamma tied to it (their L2 norm by default, or their max: `combine`, below),
so a residual group's channel is alive while any member is (alive = OR), and a depthwise
conv's input and output read the same `r`. Layouts are made of
channel positions, so a consumer of a concat reads its slice of every branch group (the
"concat" rule) and a flatten into a linear layer counts each channel once per position, as the
cost model does. Channels with no gamma (non-prunable groups, the input image, classifier
outputs, groups without a norm layer) have `r = 0` and are always alive: they cost FLOPs but
cannot be shrunk.

Algorithm: shrink (train with the task loss, SGD with momentum, constant learning rate, no
L2 decay on the gammas; after every step a proximal step on the gammas,
`gamma <- sign(gamma) max(0, |gamma| - lr lambda dR/dr)`, applies the regulariser, so gammas
reach exact zeros instead of oscillating around the 0.01 threshold), read the alive widths
`O'_g = max(#alive, min_width)`, expand with the shared target step
(`ctx.land_widths(O', importance=r)`: one bisected multiplier on the alive widths, groups at
0 stay 0, channels kept by r). With `repeats > 1` the budget is split; after each round the
channels outside the plan are zeroed and kept at zero and the next round shrinks again.

lambda: METHODS.md puts it on a log scale around 1 / initial FLOPs; at that value nothing
dies in the pipeline's short budget (measured on CIFAR ResNet-20: the plan was uniform's).
So by default it is a schedule: it starts where the pull alone would move the average
prunable channel's r by `strength` x its initial mean over the budget,
`lambda = strength * mean r / (lr * steps * mean dR/dr)`, and grows by a factor per step
(`max_growth`, 100, over the first `reach` = 60% of the steps) while the cost of the alive
widths lags a straight path from the baseline to the target; once the alive cost meets the
target the pull stops and the dead gammas stay at zero. So the shrink phase kills channels
and the expand step starts from about the target. The report gives `lambda * FLOPs0`, i.e.
where the choice sits on the paper's scale, and warns when nothing died; `--set lambda=...`
sets a fixed lambda. Deaths follow the path (`cap`, `common.cap_deaths`): a step kills only as
many gammas as the path allows, deepest below the threshold first; the others wait just above
it, first in line, and while deaths wait the strength eases off. Measured on CIFAR ResNet-20
without the cap: the stem's residual group (the costliest channels per unit of gamma) went
from 16 to 1 channel within 50 steps, overshooting the path, and the result reached 31% top-1.
A coupled channel (a residual group's) combines its gammas by their L2 norm (`combine`
"l2", the default; the proximal step scales them together, so r moves down by the step) rather
than METHODS.md's max ("max": every tied gamma moves down by the step): with max, a residual
channel of k gammas is pulled as hard as a single-gamma channel of the same FLOPs while each
of its gammas is defended only by its own block. Chosen on the validation folder (CIFAR
ResNet-20, 1/3 FLOPs, seed 0, 2 + 2 epochs): l2 44.4%, max 39.1%. Both thin the stage-1 trunk
to 1-2 channels at this budget (the costliest channels per unit of gamma); stopping the
shrink phase earlier and scaling the alive widths down (`shrink_to` 1.6) did not help (39.2%).
The pipeline fine-tunes the plan from the baseline's weights (`refit`): MorphNet's output is an
architecture (the paper retrains it), and the regulariser's pull on the surviving gammas is a
bias that a short fine-tune cannot undo.

Issue 18 item 4 (below uniform), measured 2026-12-02 on benchmarks/weights/resnet20_cifar10.pt
(86.48%), 1/3 FLOPs, 126 shrink steps on 8,000 images, one search seed, each plan scored by
adaptive BN then 30 steps on all 5,000 validation images over 3 seeds (uniform's and
magnitude's plans by `benchmarks/plan_scores.py`, MorphNet's by a scratch copy of its
method:NAME plan): with today's `--round-to 8` MorphNet's plan scores 58.9% against uniform's
47.8% and magnitude's 64.1% (54.7% at `--round-to 1`). The shrink phase still thins stage 1
to 2-4 alive channels a group: the pull per channel is its FLOPs (stage-1 trunk 2.0e6,
stage-1 branches 5.9e5, stage 3 1.1e5-3.7e5) and the loss barely resists a group-wide shrink
of gammas whose consumers are conv + BN, so groups empty in the order of starting gamma over
pull. Multiples of 8 round those groups back up to 8 and the expand step then adds 37% of
the FLOPs (2.7% at `--round-to 1`; an earlier measurement of those widths with magnitude's
channels in each group gave 39%). Tried and dropped: restoring each group's gamma norm after
the proximal step (so the pull thins a group but cannot shrink its scale): it removed a
whole stage-1 block and scored 52.8%. From the 116-epoch baseline (87.82%) the same plan
scores 49.0% against uniform's 41.7% and magnitude's 53.9% (`rank_correlation.md`).

`max_ratio` (1.0: no cap): the largest share of a group the method may remove, as magnitude's
(Torch-Pruning's `max_pruning_ratio`). In the shrink phase, of the channels the pull would
bring within twice the threshold, the least urgent are spared down to the group's floor
(`common.share_floor`: `(1 - max_ratio) x` its size, rounded up to `--round-to`): not pulled,
held at twice the threshold at least, not counted as deferred; the expand step's target step
keeps every group at its floor at least (`least`). Why: on CIFAR ResNet-32 from the 90%
baseline (eighteenth session, `cifar10_table.md`) the pull thinned the second stage's residual
stream to 8 of 32 channels (a stream channel is tied to a dozen convolutions, so it is the
costliest per unit of gamma) and the plan scored 84.94% validation top-1, just above uniform
widths' three seeds (84.28-84.80). With `max_ratio=0.7` (nineteenth session) that stream stays
at 16, the pull thins the third stage's stream instead (48 to 32 of 64), and the plan scores
85.00% (84.88-85.12, two fine-tuning seeds; test 85.13% against 85.38%): level with the
uncapped plan, so the default stays without a cap.

`cost_weight` (0.5 by default since the twenty-first session; 1.0: the paper's pull): the
proximal step pulls a channel's r by its FLOPs per unit of r (dR/dr) raised to this power,
rescaled so that the mean pull over the channels with a gamma is unchanged (so the strength
schedule needs no new calibration); 0 pulls every such channel alike, as group lasso and
vardrop do at their `cost_weight=0`. The cap above showed that the FLOP pull moves from one
stream to the next rather than losing its bias against stream channels (each tied to a dozen
convolutions); a power under 1 weakens that bias without giving up the cost signal. On
`hand_models.TwoStage` at 1/3 FLOPs the first stage's stream keeps 1 of 16 channels at 1, 10 at
0.5 and at 0. On CIFAR ResNet-32 from the 90% baseline (twentieth session, `cifar10_table.md`,
search seed 0, one fine-tuning seed) 0.5 keeps the second stage's stream whole (32; at 1: 8)
and the third's at 56 (48), and the plan scores 85.96% validation top-1 (86.40% test) against
84.94% (85.38%) at 1: a point, above uniform's three seeds beyond their spread, 0.10 above
magnitude's highest; a second search seed scores 86.34% (11 of 15 blocks). On CIFAR ResNet-20
from the 116-epoch baseline (87.80% validation; twenty-first session, same budgets, two search
seeds each, one fine-tuning seed) 0.5 scores 85.18% and 85.00% validation top-1 (85.16% and
84.32% test) against 84.86% and 83.26% (84.64% and 83.62%) at 1: a point higher on the mean
over search seeds on both models, so 0.5 is the default (decided on validation). On ResNet-20
it is level with magnitude (84.58-85.10 over three fine-tuning seeds), not ahead; on ResNet-32
0.10 and 0.48 above magnitude's highest.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from ..graph import ChannelGraph
from ..load import UserError
from ..target import legal_zeros
from .base import Method, Proposal, SearchContext
from .common import (PENALTY_BOUNDS, added_share, alive_cost, budget_steps, cap_deaths,
                     shared_bounds, constant_schedule, dropped_channels, evaluate_plan, path_ratio,
                     share_floors, spare_under_floor, strength_path, zero_channels)


class FlopRegulariser:
    """MorphNet's FLOP regulariser on a model's gammas, built from the channel graph."""

    def __init__(self, graph: ChannelGraph, model: nn.Module, threshold: float = 0.01,
                 combine: str = "max", cost_weight: float = 1.0):
        if combine not in ("max", "l2"):
            raise UserError(f"morphnet: combine={combine!r}; use max or l2")
        if not (np.isfinite(cost_weight) and cost_weight >= 0):
            raise UserError(f"morphnet: cost_weight={cost_weight!r}; use a power >= 0 (1: the "
                            "paper's FLOP pull, 0: the same pull on every channel)")
        self.graph = graph
        self.cost_weight = float(cost_weight)
        self.threshold = float(threshold)
        self.combine = combine
        self.offsets = np.concatenate([[0], np.cumsum([g.size for g in graph.groups])]
                                      ).astype(np.int64)
        self.n_pos = int(self.offsets[-1])
        params = dict(model.named_parameters())
        # gamma slices of prunable groups: (param name, positions in it, global channel position)
        self.gammas: list[tuple[str, torch.Tensor, torch.Tensor]] = []
        has_gamma = np.zeros(self.n_pos, dtype=bool)
        tied = graph.tied_parameters()
        for g in graph.prunable_groups:
            for s in tied[g.id]:
                if s.role != "gamma" or s.is_buffer or s.name not in params:
                    continue
                glob = self.offsets[g.id] + np.asarray(s.channels, dtype=np.int64)
                self.gammas.append((s.name, torch.as_tensor(s.positions, dtype=torch.long),
                                    torch.as_tensor(glob, dtype=torch.long)))
                has_gamma[glob] = True
        self.has_gamma = torch.as_tensor(has_gamma)
        # Layout table (positions, weights) and terms.
        pos, lay, w, const = [], [], [], []
        a_idx, b_idx, coeff = [], [], []
        self.term_nodes = []
        for term in graph.mac_terms():
            ids = []
            for layout in term.layouts:
                li = len(const)
                const.append(layout.const)
                pos.append(self.offsets[layout.groups] + layout.index)
                lay.append(np.full(len(layout.groups), li, dtype=np.int64))
                w.append(layout.mult)
                ids.append(li)
            if not ids:
                continue
            a_idx.append(ids[0])
            b_idx.append(ids[1] if len(ids) > 1 else -1)
            coeff.append(2.0 * term.coeff)  # FLOPs = 2 x MACs
            self.term_nodes.append(term.nodes)
        self.pos = torch.as_tensor(np.concatenate(pos) if pos else np.zeros(0), dtype=torch.long)
        self.lay = torch.as_tensor(np.concatenate(lay) if lay else np.zeros(0), dtype=torch.long)
        self.w = torch.as_tensor(np.concatenate(w) if w else np.zeros(0), dtype=torch.float64)
        self.const = torch.as_tensor(const, dtype=torch.float64)
        self.a = torch.as_tensor(a_idx, dtype=torch.long)
        b = torch.as_tensor(b_idx, dtype=torch.long)
        self.single = b < 0
        self.b = torch.where(self.single, self.a, b)
        self.coeff = torch.as_tensor(coeff, dtype=torch.float64)

    # -- per channel
    def r(self, model: nn.Module) -> torch.Tensor:
        """r over all channel positions: max |gamma| over the gammas tied to the channel
        (`combine` "max"), or their joint L2 norm ("l2"); 0 where there is none;
        differentiable."""
        params = dict(model.named_parameters())
        vals, where = [], []
        for name, positions, glob in self.gammas:
            p = params[name]
            vals.append(p.index_select(0, positions.to(p.device)).abs().to(torch.float64))
            where.append(glob)
        base = torch.zeros(self.n_pos, dtype=torch.float64)
        if not vals:
            return base
        device = vals[0].device
        if self.combine == "l2":
            sq = base.to(device).index_add(0, torch.cat(where).to(device), torch.cat(vals) ** 2)
            return sq.clamp_min(1e-300).sqrt() * (sq > 0)
        return base.to(device).scatter_reduce(0, torch.cat(where).to(device), torch.cat(vals),
                                              reduce="amax", include_self=True)

    def alive(self, r: torch.Tensor) -> torch.Tensor:
        """Alive flags (float, no gradient): |gamma| > threshold, and always where no gamma."""
        r = r.detach()
        return torch.where(self.has_gamma.to(r.device), (r > self.threshold).to(r.dtype),
                           torch.ones_like(r))

    # -- per layout and term
    def layout_sums(self, values: torch.Tensor, const: bool) -> torch.Tensor:
        dev = values.device
        out = torch.zeros(len(self.const), dtype=values.dtype, device=dev).index_add(
            0, self.lay.to(dev), self.w.to(dev) * values[self.pos.to(dev)])
        return out + self.const.to(dev) if const else out

    def value(self, r: torch.Tensor, alive: torch.Tensor | None = None) -> torch.Tensor:
        """The regulariser (lambda = 1) for channel values `r` and alive flags `alive`."""
        if alive is None:
            alive = self.alive(r)
        dev = r.device
        A = self.layout_sums(alive, const=True)
        R = self.layout_sums(r, const=False)
        a, b, coeff, single = (t.to(dev) for t in (self.a, self.b, self.coeff, self.single))
        two = A[a] * R[b] + A[b] * R[a]
        one = R[a] + R[a]  # depthwise: sum r_in + sum r_out, in = out
        return (coeff * torch.where(single, one, two)).sum()

    def __call__(self, model: nn.Module) -> torch.Tensor:
        return self.value(self.r(model))

    def pull(self, r: torch.Tensor) -> torch.Tensor:
        """The pull on each channel's r: dR/dr (a channel's FLOPs per unit of r at the alive
        counts), raised to `cost_weight` and rescaled so that the mean pull over the channels
        with a gamma is unchanged (1: the paper's; 0: every such channel pulled alike)."""
        r = r.detach().requires_grad_(True)
        g = torch.autograd.grad(self.value(r), r)[0] if r.numel() else r.detach()
        if self.cost_weight == 1.0 or not r.numel():
            return g
        has = self.has_gamma.to(g.device)
        w = torch.where(has & (g > 0), g.clamp_min(1e-300) ** self.cost_weight,
                        torch.zeros_like(g))
        mean_w = float(w[has].mean()) if has.any() else 0.0
        return w * (float(g[has].mean()) / mean_w) if mean_w > 0 else g

    def flops(self, alive: torch.Tensor) -> float:
        """FLOPs of the alive counts (cost = coeff * A_in * A_out; depthwise coeff * A)."""
        A = self.layout_sums(alive.to(torch.float64), const=True)
        per = torch.where(self.single, A[self.a], A[self.a] * A[self.b])
        return float((self.coeff * per).sum())

    def per_group(self, values: torch.Tensor) -> dict[int, np.ndarray]:
        v = values.detach().cpu().numpy()
        return {g.id: v[self.offsets[g.id]:self.offsets[g.id + 1]]
                for g in self.graph.prunable_groups}


# --------------------------------------------------------------------------- the method


class MorphNet(Method):
    name = "morphnet"
    summary = ("FLOP regulariser on norm gammas (cross structure, residual groups by the norm "
               "of their gammas), "
               "strength grown until the alive cost reaches the target, then expand the alive "
               "widths by one multiplier")
    cost = "one shrinking phase of --search-epochs (split over repeats), then the fine-tuning"
    choices = {"combine": ("l2", "max")}
    defaults = {
        "lambda": None,  # None: the growing schedule (module docstring); a number: fixed
        "strength": 1.0,  # the schedule's starting strength
        "growth": None,  # factor per step while the alive cost lags; None: from max_growth
        "max_growth": 100.0,  # the strength may grow this much over the reach window
        "reach": 0.6,  # the alive cost should reach the target by this fraction of a round
        "shrink_to": 1.0,  # the shrink phase stops at this alive cost (times the target)
        "threshold": 0.01,  # alive: |gamma| > threshold
        "combine": "l2",  # a coupled channel's r: the norm of its gammas, or "max" (docstring)
        "cost_weight": 0.5,  # a channel's pull: its FLOPs ^ this (rescaled; docstring)
        "lr": None,  # None: the run's search lr (ctx.lr), constant
        "momentum": 0.9,
        "weight_decay": 5e-4,  # on everything but the gammas
        "repeats": 1,
        "cap": True,  # deaths beyond the schedule's path are deferred (common.cap_deaths)
        "max_ratio": 1.0,  # the largest share of a group the shrink may remove (docstring)
        "refit": True,  # the fine-tuning starts from the baseline's weights on the plan
        "evaluate": True,  # record the plan's accuracy (dropped channels zeroed) as a candidate
    }
    bounds = {**shared_bounds(defaults, PENALTY_BOUNDS), "repeats": "[1, inf)",
              "shrink_to": "(0, inf)", "strength": "(0, inf)", "threshold": "[0, inf)",
              "weight_decay": "[0, inf)"}

    def search(self, ctx: SearchContext) -> Proposal:
        s = self.settings_of(ctx)
        max_ratio = float(s["max_ratio"])
        graph, model = ctx.graph, ctx.model
        least = share_floors(graph, max_ratio, ctx.round_to)
        reg = FlopRegulariser(graph, model, float(s["threshold"]), str(s["combine"]),
                              float(s["cost_weight"]))
        lr = float(s["lr"]) if s["lr"] is not None else float(ctx.lr)
        momentum, wd = float(s["momentum"]), float(s["weight_decay"])
        repeats = int(s["repeats"])
        epochs = float(ctx.epochs) / repeats
        steps = budget_steps(ctx, epochs) if epochs > 0 else 0
        flops0 = float(graph.baseline.flops)
        gamma_names = {name for name, _, _ in reg.gammas}
        ev, ratio, r_full, reach, growth = strength_path(ctx, s, steps)
        fixed = s["lambda"] is not None
        goal = float(s["shrink_to"])

        # lambda
        r0 = reg.r(model).detach()
        grad = reg.pull(r0)
        mask = reg.has_gamma
        mean_r = float(r0.detach()[mask].mean()) if mask.any() else 0.0
        mean_g = float(grad[mask].mean()) if mask.any() else 0.0
        if fixed:
            lam0 = float(s["lambda"])
        elif mean_g > 0 and steps > 0:
            # the proximal step applies the pull directly (no momentum gain)
            lam0 = float(s["strength"]) * mean_r / (lr * steps * mean_g)
        else:
            lam0 = 1.0 / flops0
        ctx.log(f"morphnet: lambda {lam0:.4g} = {lam0 * flops0:.4g} / FLOPs0 at the start "
                f"({'fixed' if fixed else f'x{growth:g} per step while the alive cost lags'}); "
                f"{steps} steps at constant lr {lr:g} per round, {repeats} round(s)")

        state0 = {k: v.detach().clone() for k, v in model.state_dict().items()}
        dropped: dict[int, np.ndarray] = {}
        holder: dict = {"lambda": lam0}
        trace: list = []

        def make_optimizer(m: nn.Module) -> torch.optim.Optimizer:
            named = [(n, p) for n, p in m.named_parameters() if p.requires_grad]
            groups = [{"params": [p for n, p in named if n not in gamma_names],
                       "weight_decay": wd},
                      {"params": [p for n, p in named if n in gamma_names], "weight_decay": 0.0}]
            opt = torch.optim.SGD([g for g in groups if g["params"]], lr=lr, momentum=momentum)
            # the schedule's state rides in the optimizer (saved with the training checkpoint)
            opt.param_groups[0]["mn_lambda"] = holder["lambda"]
            opt.param_groups[0]["mn_hold"] = False
            holder["opt"] = opt
            return opt

        def penalty(m: nn.Module) -> torch.Tensor:
            # Logged only (detached): the proximal step on the gammas applies it, and records
            # which gammas were dead (exactly 0) before this step.
            with torch.no_grad():
                r = reg.r(m)
                holder["dead"] = (r == 0) & reg.has_gamma.to(r.device)
                lam = holder["opt"].param_groups[0]["mn_lambda"] if "opt" in holder else lam0
                return lam * reg.value(r)

        @torch.no_grad()
        def on_step(m: nn.Module, step: int) -> None:
            opt = holder["opt"]
            pg = opt.param_groups[0]
            if dropped:  # channels outside the previous round's plan stay removed
                zero_channels(graph, m, dropped, opt)
            params = dict(m.named_parameters())
            dead = holder.get("dead")
            r = reg.r(m)
            with torch.enable_grad():
                g = reg.pull(r)
            thr = torch.zeros_like(g) if pg["mn_hold"] else lr * pg["mn_lambda"] * g
            f = (step - holder.get("round_start", 0)) / max(steps, 1)
            wanted = path_ratio(r_full, goal, f, reach)
            deferred = 0
            if not fixed and not pg["mn_hold"] and s["cap"]:
                # deaths beyond the path wait (common.cap_deaths)
                rd = r.detach()
                has = reg.has_gamma.to(rd.device)
                alive_now = (rd > reg.threshold) | ~has
                dying = alive_now & has & (rd - thr <= reg.threshold)
                if dead is not None:
                    dying &= ~dead.to(rd.device)
                urg = ((rd - reg.threshold) / thr.clamp_min(1e-30))  # smaller: dies first
                if max_ratio < 1.0:
                    # no group loses more than `max_ratio` of itself (spare_under_floor): of
                    # the channels the pull would bring within twice the threshold, the least
                    # urgent are spared down to the group's floor. A spared channel is not
                    # pulled, and is held at twice the threshold at least (a margin against
                    # the task gradient's drift, which goes on after the pull stops); it is
                    # not counted as deferred (the strength need not ease off for it).
                    # (a dead channel the task gradient moved off zero is zeroed again below:
                    # it counts as neither alive nor near)
                    living = alive_now if dead is None else alive_now & ~dead.to(rd.device)
                    near = living & has & (rd - thr <= 2 * reg.threshold)
                    kept = spare_under_floor(graph, reg.per_group(living),
                                             reg.per_group(near), reg.per_group(urg),
                                             ctx.round_to, max_ratio)
                    spared = torch.zeros_like(near)
                    for gid, k in kept.items():
                        o = int(reg.offsets[gid])
                        spared[o:o + len(k)] = near[o:o + len(k)] & ~torch.as_tensor(
                            k, device=near.device)
                    dying &= ~spared
                    thr = torch.where(spared, (rd - 2 * reg.threshold).clamp(max=0.0), thr)
                if dying.any():
                    allowed = cap_deaths(graph, ev, ratio, reg.per_group(alive_now),
                                         reg.per_group(dying), reg.per_group(urg),
                                         max(goal, wanted))
                    ok = torch.zeros_like(dying)
                    for gid, a in allowed.items():
                        o = int(reg.offsets[gid])
                        ok[o:o + len(a)] = torch.as_tensor(a, device=ok.device)
                    wait = dying & ~ok
                    deferred = int(wait.sum())
                    # they wait just above the alive threshold: first to die next time
                    thr = torch.where(wait, (rd - reg.threshold * (1 + 1e-3)).clamp_min(0.0), thr)
            if dead is not None:
                thr = torch.where(dead.to(thr.device), torch.full_like(thr, float("inf")), thr)
            for name, positions, glob in reg.gammas:
                p = params[name]
                pos = positions.to(p.device)
                v = p.index_select(0, pos)
                t = thr[glob.to(thr.device)].to(p.device, p.dtype)
                if reg.combine == "l2":  # the group proximal step: r moves down by t
                    rc = r.detach()[glob.to(r.device)].to(p.device, p.dtype)
                    new = v * (1 - t / torch.where(rc > 0, rc, torch.ones_like(rc))).clamp_min(0)
                else:  # every tied gamma moves down by t, so the max does
                    new = torch.sign(v) * (v.abs() - t).clamp_min(0.0)
                p.index_copy_(0, pos, new)
                buf = opt.state.get(p, {}).get("momentum_buffer")
                if buf is not None:
                    keep = torch.ones_like(buf)
                    keep.index_copy_(0, pos, (new != 0).to(buf.dtype))
                    buf.mul_(keep)
            if fixed or pg["mn_hold"]:
                return
            alive = reg.per_group(reg.alive(reg.r(m)))
            cur = ratio(alive_cost(graph, {gid: v > 0 for gid, v in alive.items()}, ev))
            holder["deferred"] = holder.get("deferred", 0) + deferred
            if cur <= goal:
                pg["mn_hold"] = True
            elif deferred:
                pg["mn_lambda"] = pg["mn_lambda"] / growth  # ahead of the path: ease off
            elif cur > wanted:
                pg["mn_lambda"] = pg["mn_lambda"] * growth
            if step % max(1, steps // 20) == 0 or pg["mn_hold"]:
                trace.append({"step": int(step), "lambda": float(pg["mn_lambda"]),
                              "alive_cost_ratio": cur, "deferred": deferred,
                              "hold": bool(pg["mn_hold"])})

        rounds = []
        fallbacks: list = []
        plan = None
        for k in range(repeats):
            if steps > 0:
                ctx.train(model, epochs, f"morphnet-{k}" if repeats > 1 else "morphnet",
                          lr=lr, momentum=momentum, weight_decay=wd, optimizer=make_optimizer,
                          scheduler=constant_schedule, extra_loss=penalty, on_step=on_step)
                if "opt" in holder:
                    holder["lambda"] = holder["opt"].param_groups[0]["mn_lambda"]
            with torch.no_grad():
                r = reg.r(model)
                alive = reg.alive(r)
            r_g, alive_g = reg.per_group(r), reg.per_group(alive)
            alive_widths = {g.id: int(alive_g[g.id].sum()) for g in graph.prunable_groups}
            widths = {g.id: max(alive_widths[g.id], g.min_width) for g in graph.prunable_groups}
            widths = legal_zeros(graph, widths,
                                 priority={g: float(v.max(initial=0.0)) for g, v in r_g.items()})
            # expand from the alive widths (channels kept by r; groups at 0 stay at 0)
            try:
                plan = ctx.land_widths(widths, importance=r_g, least=least)
            except UserError as exc:
                # the graph cannot realise the alive channels (seen on ShuffleNetV2: a split
                # part left empty); expand from the full widths, ranked by r, and say so
                ctx.log(f"morphnet: WARNING the alive widths give no plan ({exc}); one "
                        "multiplier on the full widths instead")
                fallbacks.append(str(exc))
                plan = ctx.land_widths({}, importance=r_g, least=least)
            own = {g.id: np.flatnonzero(alive_g[g.id] > 0) for g in graph.prunable_groups}
            rounds.append({"alive_widths": widths, "alive_counts": alive_widths,
                           "widths": dict(plan.widths),
                           "alive_flops": reg.flops(alive),
                           "alive_cost_ratio": ratio(alive_cost(
                               graph, {gid: v > 0 for gid, v in alive_g.items()}, ev)),
                           "lambda_end": float(holder["lambda"]),
                           "regulariser": float(reg.value(r, alive)),
                           "flops": plan.achieved["flops"],
                           "expanded_by": added_share(graph, own, plan)})
            ctx.log(f"morphnet round {k + 1}: alive widths reach {rounds[-1]['alive_flops']:.4g} "
                    f"FLOPs; expanded to {plan.achieved['flops']:.4g}")
            if k + 1 < repeats:
                dropped = dropped_channels(graph, plan.keep)
                zero_channels(graph, model, dropped, holder.get("opt"))
                holder.pop("opt", None)
        prunable = [g for g in graph.prunable_groups if bool(reg.has_gamma[
            reg.offsets[g.id]:reg.offsets[g.id + 1]].any())]
        died = int(sum(g.size - rounds[-1]["alive_counts"][g.id] for g in prunable))
        info = {
            "lambda": lam0, "lambda_times_flops0": lam0 * flops0,
            "lambda_final": float(holder["lambda"]),
            "schedule": "fixed" if fixed else "growing", "growth": growth,
            "strength": None if fixed else float(s["strength"]),
            "threshold": float(s["threshold"]), "cost_weight": reg.cost_weight,
            "lr": lr, "momentum": momentum,
            "epochs": float(ctx.epochs), "steps_per_round": steps, "repeats": repeats,
            "alive_widths": rounds[-1]["alive_widths"], "widths": rounds[-1]["widths"],
            "channels_died": died, "channels_with_gamma": int(sum(g.size for g in prunable)),
            "alive_cost_ratio": rounds[-1]["alive_cost_ratio"],
            "expand_added_flops_share": rounds[-1]["expanded_by"]["flops_share_added"],
            "rounds": rounds, "trace": trace,
        }
        if fallbacks:
            info["expand_fallback"] = fallbacks
        if died == 0:
            info["warning"] = ("no channel died in the shrink phase: the plan is one multiplier "
                               "on the full widths, i.e. uniform's")
            ctx.log("morphnet: WARNING " + info["warning"])
        info["deaths_deferred"] = int(holder.get("deferred", 0))
        info["refit"] = bool(s["refit"])
        if s["refit"]:
            # the shrink phase chose the widths and channels; the fine-tuning starts from the
            # baseline's weights on them (MorphNet's output is an architecture), not from
            # gammas the regulariser pulled towards zero
            if s["evaluate"]:
                info["plan_accuracy_shrunk_weights"] = evaluate_plan(
                    ctx, model, plan, "morphnet plan, shrunk weights")
            model.load_state_dict(state0)
            ctx.log("morphnet: the plan's channels restart from the baseline's weights (refit)")
        if s["evaluate"]:
            info["plan_accuracy_before_finetune"] = evaluate_plan(
                ctx, model, plan, "morphnet plan (before fine-tuning)")
        return Proposal(plan, model.state_dict(), info)
