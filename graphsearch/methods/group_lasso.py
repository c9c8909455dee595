"""`group-lasso`: structured sparsity by a group-lasso penalty per coupled channel (Wen et al.
2016; METHODS.md section 1).

Penalty `lambda * sum_c ||theta_c||_2`, where `theta_c` gathers everything tied to coupled
channel `c`: the output rows of every producer of its group (conv/linear rows and biases, the
depthwise kernel of `c`), the gamma and beta of every norm layer on it, and the input columns
of every consumer. Putting gamma and beta in the group avoids the two BatchNorm traps: a
conv-only penalty is rescaled away by gamma, and a channel with zero weights would still emit
relu(beta). Plain L2 norms, no sqrt(size) weight.

Optimisation is proximal SGD (forward-backward splitting): every step is an SGD step on the
task loss (momentum, no weight decay), followed by the proximal operator of the penalty,
`theta_c <- theta_c * max(0, 1 - lr_t * lambda / ||theta_c||)`, applied to all tied slices of
`c` at once. That is what yields exact zeros; the penalty is therefore *not* also
differentiated in the loss (that would apply it twice; its value is still logged as the
"extra loss"). Dead channels stay dead: their momentum entries are zeroed with them, there is
no weight decay, and the next proximal step takes back whatever small gradient reached them.

Strength (the issue "the methods decide"): at the published lambda (about 3e-3, lr 1e-3, a
long sparsity phase) the pipeline's short search budget (a few hundred steps) zeroes
nothing, and the plan was magnitude's ranking of the shrunk norms. So by default lambda is
a schedule: it starts where the total shrinkage over the budget would be `shrink` (0.3)
times the mean initial joint norm, and grows by a factor per step (`max_growth`, 100, spread
over the first `reach` = 60% of the steps) whenever the cost of the model without its
exactly-zero channels lags a straight path from the baseline to the target; once that cost
meets every target, the penalty stops ("hold"): the dead stay dead (their slices are zeroed
after every step, momentum included) and the survivors train on without it. So the zeros'
cost reaches the target within the budget, and the zeros decide the plan: on a planted
model (tests/test_methods_planted.py) exactly the channels the loss does not defend die.
Deaths follow that path (`cap`): the proximal threshold is absolute, so a group whose norms
are concentrated dies all at once when the strength passes them (measured on CIFAR ResNet-20
without the cap: nothing died for 48 steps, then one step zeroed 407 of 448 channels and the
survivors' mean norm fell to 0.4% of its start; 17.6% top-1 after fine-tuning). So a step
kills only as many of the channels it would zero as the path allows, deepest below the
threshold first (`common.cap_deaths`); the others wait at a thousandth of the threshold, first
in line for the next step, and while deaths wait the strength eases off (divided by the growth
factor). After the phase the plan's channels restart from the baseline's weights (`refit`,
the relaxed lasso's debiasing): the penalty chose the support, but its shrinkage of the
survivors is a bias, not information, and a short fine-tune cannot undo it.
The per-group threshold is scaled by the group's mean initial norm (`balance`), so that a group
whose channels gather many tied slices (a residual stage) shrinks at the same relative rate as
the others, and by what one of its channels costs in the target's metric (per tied weight
tensor: `cost_per`, below) relative to the mean channel (`cost_weight`, the power of that
ratio; 1 by default, 0 for the paper's plain penalty): resource-weighted group lasso, the
penalty MorphNet's FLOP regulariser generalises. Unweighted, a FLOPs target took the cheap
channels of the low-resolution stage (rich in parameters) as readily as the expensive ones: 83k
parameters kept at 1/3 FLOPs on CIFAR ResNet-20 where uniform widths keep 108k, and 1.3 points
under uniform after the same fine-tune (`common.cost_weights`). The lr is the run's search lr
(`lr` None): the task gradient defends a channel with lr * grad per step (times the momentum
gain) against lr * lambda, and a higher lr needs a smaller lambda for the same shrinkage, so
more of the ranking is the data's.
`--set lambda=...` gives a fixed lambda instead.
`floor` (on by default since the twenty-second session) spares deaths that would leave a
stream under the smallest width the plan keeps (8 at `--round-to 8`,
`common.spare_under_floor`) and counts the zeros' cost at the widths the plan will keep
(`common.alive_cost` with the plan's multiple: a group's alive count rounded up, as the
landing rounds it). Without it the zeros chase the cost of the alive channels alone, and the
plan is dearer than the zeros: on CIFAR ResNet-20 (116-epoch baseline, 1/3 FLOPs, per slice)
the first stage kept 1-3 alive channels a group, which the plan keeps at 8, so the landing had
to take the difference from the survivors, by their normalised norms: the second stage's
residual stream went from 20 alive channels to 8 of 32 and a third-stage inner convolution
from 57 to 32 of 64, and the plan scored 83.90% validation top-1 after the fine-tune, under
uniform widths (84.66-85.16). With `floor` (and the rounded count) the stream keeps 16 and the
plan scores 85.42% and 84.58% over two search seeds (85.50%, 85.00% test), level with uniform;
on ResNet-32 85.56% and 85.64% (86.24%, 86.42% test) against 86.42% and 85.50% without it,
inside that spread (`cifar10_table.md`, twenty-second session). The eighth session had
measured it off (83.44% against 83.68%, one seed each, per-channel costs and a count without
the rounding). At that
budget the sparsity phase leaves the network at 10-28% top-1 whatever the variant (at the
defaults the mean channel norm ends at a quarter of its start after 126 steps), so
the penalty's decisions rest on the ratio of each channel's norm to its threshold.

Scores are the final joint norms divided by their group's mean final norm (`normalise`
"final", the default), as `magnitude` does, with the exact zeros below every survivor, the
last to die ranked first: layers of different fan-in then compete on one
scale, and within a group the penalty's ranking decides. Measured on CIFAR-10 (ResNet-20,
1/3 FLOPs, `benchmarks/results/cifar10_table.md`): "final" 71.6% after fine-tuning; "initial"
(divide by the group's mean *initial* norm, meant to let a group the penalty shrank as a whole
rank low) 66.1%, because the proximal threshold is absolute: a residual group's joint norm
gathers many tied slices, shrinks relatively least, and kept all its channels while the
block-inner convs fell to 3-7 of 64; raw norms ("none") were worse still (37.9% with the old
lambda). `--set normalise=initial|none` gives the other rankings.

`max_ratio` (1.0: no cap): the largest share of a group the penalty may remove, as
magnitude's. Deaths that would leave a group under its floor (`common.share_floor`:
`(1 - max_ratio) x` its size, rounded up) are spared (`common.spare_under_floor`) and the
target step keeps every group at its floor at least. On CIFAR ResNet-32 from the 90% baseline
the cost-weighted penalty thinned the second stage's residual stream to 8 of 32 channels and
the plan scored 83.78% validation top-1, under uniform widths (eighteenth session). With
`max_ratio=0.7` that stream stays at 16, the third stage's goes from 32 to 24 of 64, and the
plan scores 84.24% (test 84.36% against 85.26%; one seed, nineteenth session), still just
under uniform's lowest seed: the default stays without a cap. A lower cost weight does not
help either: at `cost_weight=0.5` (twentieth session, one seed) the second stage's stream
keeps 24 of 32 but the third stage's goes to 16 of 64, 136,626 parameters, 82.42% validation
(83.04% test), 1.36 points under the per-channel plan.

`cost_per` ("slice", the default since the twenty-first session; "channel" before): what a
channel's cost is counted per. With `balance` every group shrinks at the same relative rate, so
the cost weight alone ranks the groups; per channel, a residual stream's channel, a row or
column of every convolution on the stream (11-13 weight tensors in ResNet-32 against 2 for a
block's inner channel), paid 4.5-5.4 times what its stage's inner channels paid, and the
penalty emptied streams while it kept the third stage's inner convolutions whole (search only,
ResNet-32: streams at 8, 8 and 32 of 16, 32 and 64; `balance=false` left a stream at 8 of 32 at
cost weight 1 and at 16 of 64 at 0.5; `cost_weight=0.25` kept streams at 8, 24 and 40 with
151,826 parameters; those three plans were not fine-tuned). Per tied weight tensor
(`common.cost_weights`, `weight_ties`) a stream's channel pays what one of its convolutions'
channels costs, 0.8 times its stage's inner channels: the plan keeps the streams at 8, 24 and
64, thins the inner convolutions (8 in the second stage, 32-56 in the third) and removes two of
the first stage's blocks, 244,466 parameters, and scores 86.42% validation top-1 (86.76% test)
against 83.78% (85.26%) per channel: above uniform widths' three seeds (84.28-84.80) by 1.6
points and magnitude's (85.48-85.86) by 0.6 (one fine-tuning seed, twenty-first session,
`cifar10_table.md`); a second search seed removes the whole first stage's blocks and scores
85.50% (86.30%). On CIFAR ResNet-20 (116-epoch baseline, one seed) it does not help: 83.90%
against 84.46% per channel, both under uniform (84.66-85.16); the second stage's stream goes to
8 of 32 either way, although per slice it is charged 0.7 times its stage's inner channels there
too (both without `floor`). The penalty had left it 20 alive channels: the landing thinned
it to 8, making up the cost of the alive channels rounded up to multiples of 8 (`floor`, above).
"""

from __future__ import annotations

from typing import Mapping

import numpy as np
import torch
from torch import nn

from ..graph import ChannelGraph
from .base import Method, Proposal, SearchContext
from .common import (COST_PER, ROLES, tied_by_param, added_share, alive_cost,  # noqa: F401
                     budget_steps, cap_deaths, PENALTY_BOUNDS, cost_weights, path_ratio,
                     share_floors, shared_bounds, spare_under_floor,
                     constant_schedule, dropped_channels, evaluate_plan, recalibrate_bn,
                     scale_channels, strength_path, zero_channels)


# --------------------------------------------------------------------------- the proximal step


@torch.no_grad()
def proximal_step(ctx: SearchContext, model: nn.Module, threshold: float,
                  optimizer: torch.optim.Optimizer | None = None) -> dict[int, torch.Tensor]:
    """The group-lasso proximal operator with threshold `lr_t * lambda`:
    `theta_c <- theta_c * max(0, 1 - threshold / ||theta_c||)` on every tied slice of c
    (all factors come from the norms before any slice changes). Returns the factors."""
    norms = ctx.channel_norms(model, roles=ROLES)
    factors = {}
    for gid, n in norms.items():
        safe = torch.where(n > 0, n, torch.ones_like(n))
        factors[gid] = torch.where(n > 0, (1 - threshold / safe).clamp_min(0.0),
                                   torch.zeros_like(n))
    scale_channels(ctx.graph, model, factors, optimizer)
    return factors


@torch.no_grad()
def revive(graph: ChannelGraph, model: nn.Module, initial: Mapping[str, torch.Tensor],
           norms0: Mapping[int, torch.Tensor], norms: Mapping[int, torch.Tensor],
           keep: Mapping[int, list[int]]) -> int:
    """Channels the plan keeps although their joint norm is exactly zero would stay at zero
    through the fine-tuning (every gradient into them is zero: a saddle), costing FLOPs for
    nothing. They restart from their initial values times the mean shrink of the surviving
    channels (final / initial mean norm of the nonzero ones), i.e. at the survivors' scale.
    Returns how many channels were revived."""
    dead = {}
    for gid, n in norms.items():
        kept = np.zeros(len(n), dtype=bool)
        kept[np.asarray(keep[gid], dtype=np.int64) if gid in keep else slice(None)] = True
        d = kept & (n.cpu().numpy() == 0)
        if d.any():
            dead[gid] = torch.as_tensor(d)
    if not dead:
        return 0
    alive_now = torch.cat([n[n > 0].double() for n in norms.values()])
    alive_before = torch.cat([norms0[g][n > 0].double() for g, n in norms.items()])
    scale = float(alive_now.mean() / alive_before.mean()) if alive_now.numel() else 1.0
    for gid, slices in tied_by_param(graph, model).items():
        if gid not in dead:
            continue
        for name, p, dim, pos, ch in slices:
            sel = dead[gid].to(ch.device)[ch]
            if not sel.any():
                continue
            at = pos[sel]
            p.index_copy_(dim, at, initial[name].index_select(dim, at) * scale)
    return int(sum(int(d.sum()) for d in dead.values()))


class GroupLasso(Method):
    name = "group-lasso"
    summary = ("group-lasso penalty on everything tied to each coupled channel, proximal SGD "
               "with a strength that grows until the exactly-zero channels' cost reaches the "
               "target; the zeros decide the plan")
    cost = "one sparsity phase of --search-epochs (proximal SGD), then the fine-tuning"
    choices = {"cost_per": COST_PER,
               "normalise": ("final", "initial", "none", "true", "false")}
    defaults = {
        "lambda": None,  # None: the growing schedule (module docstring); a number: fixed
        "shrink": 0.3,  # the schedule's starting strength (total shrink over the budget)
        "growth": None,  # factor per step while the zeros lag; None: max_growth over reach
        "max_growth": 100.0,  # the strength may grow this much over the reach window
        "reach": 0.6,  # the zeros' cost should reach the target by this fraction of the phase
        "balance": True,  # per-group threshold scaled by the group's mean initial norm
        "cost_weight": 1.0,  # and by its channels' cost in the target's metric ^ this
        "cost_per": "slice",  # that cost per tied weight tensor, or per channel (docstring)
        "lr": None,  # None: the run's search lr (ctx.lr), constant (module docstring)
        "momentum": 0.9,
        "normalise": "final",  # "final", "initial" or "none" (module docstring)
        "cap": True,  # deaths beyond the schedule's path are deferred (common.cap_deaths)
        "floor": True,  # no stream under the plan's least width; zeros' cost at plan widths
        "max_ratio": 1.0,  # the largest share of a group the penalty may remove (docstring)
        "refit": True,  # the fine-tuning starts from the baseline's weights on the plan
        "revive": True,  # (refit off) kept exact zeros get their rescaled initial weights
        "bn_batches": 20,  # batches to re-estimate BN statistics after the sparsity phase
        "evaluate": True,  # record the plan's accuracy (dropped channels zeroed) as a candidate
    }
    bounds = {**shared_bounds(defaults, PENALTY_BOUNDS), "shrink": "(0, inf)",
              "bn_batches": "[0, inf)"}

    def search(self, ctx: SearchContext) -> Proposal:
        s = self.settings_of(ctx)
        max_ratio = float(s["max_ratio"])
        mode = str(s["normalise"]).lower()
        model, graph = ctx.model, ctx.graph
        lr = float(s["lr"]) if s["lr"] is not None else float(ctx.lr)
        momentum = float(s["momentum"])
        epochs = float(ctx.epochs)
        steps = budget_steps(ctx, epochs) if epochs > 0 else 0
        with torch.no_grad():
            norms0 = ctx.channel_norms(model, roles=ROLES)
            initial = {k: v.detach().clone() for k, v in model.named_parameters()}
            state0 = {k: v.detach().clone() for k, v in model.state_dict().items()}
        all0 = torch.cat([n.double() for n in norms0.values()]) if norms0 else torch.zeros(1)
        mean0 = float(all0.mean())
        fixed = s["lambda"] is not None
        if fixed:
            lam0 = float(s["lambda"])
        else:
            lam0 = float(s["shrink"]) * mean0 / max(lr * steps, 1e-12)  # sum_t lr_t = lr * steps
        pay = cost_weights(ctx, float(s["cost_weight"]), s["cost_per"], self.name)
        weight = {gid: (float(n.double().mean()) / max(mean0, 1e-12)
                        if s["balance"] else 1.0) * pay.get(gid, 1.0)
                  for gid, n in norms0.items()}
        ev, ratio, r0, reach, growth = strength_path(ctx, s, steps)
        # the zeros' cost counts widths as the plan will keep them (`floor`)
        rt = int(ctx.round_to) if s["floor"] else 1
        ctx.log(f"group-lasso: lambda {lam0:.4g} at the start "
                f"({'fixed' if fixed else f'x{growth:g} per step while the zeros lag'}; mean "
                f"initial channel norm {mean0:.4g}, {steps} steps at lr {lr:g})")

        holder: dict = {}
        trace: list = []

        def make_optimizer(m: nn.Module) -> torch.optim.Optimizer:
            opt = torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=lr,
                                  momentum=momentum, weight_decay=0.0)
            # the schedule's state rides in the optimizer (saved with the training checkpoint)
            opt.param_groups[0]["gl_lambda"] = lam0
            opt.param_groups[0]["gl_hold"] = False
            # when each channel died: step + how close it came to surviving (norm / threshold)
            opt.param_groups[0]["gl_death"] = {str(g): [-1.0] * len(n) for g, n in norms0.items()}
            holder["opt"] = opt
            return opt

        def penalty(m: nn.Module) -> torch.Tensor:
            # Logged only (detached): the proximal step applies the penalty.
            with torch.no_grad():
                lam = holder["opt"].param_groups[0]["gl_lambda"] if "opt" in holder else lam0
                n = ctx.channel_norms(m, roles=ROLES)
                holder["dead"] = {g: v == 0 for g, v in n.items()}  # dead before this step
                return lam * sum(weight[g] * v.sum() for g, v in n.items()) if n \
                    else torch.zeros(())

        @torch.no_grad()
        def on_step(m: nn.Module, step: int) -> None:
            opt = holder["opt"]
            pg = opt.param_groups[0]
            lr_t = pg["lr"]  # constant schedule: the lr just used
            norms = ctx.channel_norms(m, roles=ROLES)
            dead = holder.get("dead") or {gid: (n == 0) for gid, n in norms.items()}
            if pg["gl_hold"]:
                # target reached: dead stay dead, the survivors train without the penalty
                factors = {gid: (~d).to(norms[gid].dtype) for gid, d in dead.items()}
                scale_channels(graph, m, factors, opt)
                return
            lam = pg["gl_lambda"]
            factors, urgency = {}, {}
            for gid, n in norms.items():
                safe = torch.where(n > 0, n, torch.ones_like(n))
                thr = lr_t * lam * weight[gid]
                factors[gid] = torch.where((n > 0) & ~dead[gid], (1 - thr / safe).clamp_min(0.0),
                                           torch.zeros_like(n))
                urgency[gid] = (n / max(thr, 1e-30)).cpu().numpy()
            f = step / max(steps, 1)
            wanted = path_ratio(r0, 1.0, f, reach)
            deferred = 0
            alive_before = {gid: ((n > 0) & ~dead[gid]).cpu().numpy()
                            for gid, n in norms.items()}
            dying = {gid: alive_before[gid] & (factors[gid] == 0).cpu().numpy()
                     for gid in norms}
            # Deaths that would leave a plan the graph cannot realise (a stem, a group under
            # its minimum width, every branch of a stage) are spared this step, the strongest
            # of the dying first (common.cap_deaths with no cost floor): emptied, what the
            # model needs cuts its signal, and a BN after a near-dead channel turns its tiny
            # inputs into huge gradients (measured on ShuffleNet-V2, cost-weighted: the stem
            # and then a whole stage died in one step, the next weights reached inf, and no
            # plan could be landed on the zeros).
            if any(d.any() for d in dying.values()) and (s["floor"] or max_ratio < 1.0):
                # a stream or stem under the smallest width the plan keeps buys nothing, and
                # no group loses more than `max_ratio` of itself (common.spare_under_floor):
                # those deaths are spared this step
                kept = spare_under_floor(graph, alive_before, dying, urgency, rt, max_ratio)
                for gid in norms:
                    spare = dying[gid] & ~kept[gid]
                    if spare.any():
                        factors[gid][torch.as_tensor(spare).to(factors[gid].device)] = 1.0
                        dying[gid] = kept[gid]
            if any(d.any() for d in dying.values()):
                legal = cap_deaths(graph, ev, ratio, alive_before, dying, urgency, -np.inf)
                for gid in norms:
                    spare = dying[gid] & ~legal[gid]
                    if spare.any():
                        factors[gid][torch.as_tensor(spare).to(factors[gid].device)] = 1.0
                        dying[gid] = dying[gid] & legal[gid]
            if not fixed and s["cap"]:
                # deaths beyond the path wait (common.cap_deaths)
                allowed = cap_deaths(graph, ev, ratio, alive_before, dying, urgency,
                                     max(1.0, wanted), rt)
                for gid in norms:
                    wait = torch.as_tensor(dying[gid] & ~allowed[gid])
                    if wait.any():
                        deferred += int(wait.sum())
                        # they wait at a thousandth of the threshold (not a fraction of
                        # their norm: repeated, that underflows to an exact zero), first to
                        # die next time
                        n = norms[gid]
                        hold_at = (1e-3 * lr_t * lam * weight[gid]
                                   / torch.where(n > 0, n, torch.ones_like(n))).clamp(max=1.0)
                        factors[gid] = torch.where(wait.to(factors[gid].device), hold_at,
                                                   factors[gid])
            for gid, n in norms.items():
                died = ((factors[gid] == 0) & (n > 0) & ~dead[gid]).nonzero().flatten().tolist()
                record = pg["gl_death"][str(gid)]
                for c in died:
                    record[c] = float(step) + min(float(urgency[gid][c]), 0.999)
            scale_channels(graph, m, factors, opt)
            if fixed:
                return
            alive = {gid: (f > 0).cpu().numpy() for gid, f in factors.items()}
            r = ratio(alive_cost(graph, alive, ev, rt))
            if r <= 1.0:
                pg["gl_hold"] = True
            elif deferred:
                # ahead of the path: ease off
                pg["gl_lambda"] = lam / growth
            elif r > wanted:
                pg["gl_lambda"] = lam * growth
            holder["deferred"] = holder.get("deferred", 0) + deferred
            if step % max(1, steps // 20) == 0 or pg["gl_hold"]:
                trace.append({"step": int(step), "lambda": float(lam), "zero_cost_ratio": r,
                              "deferred": deferred, "hold": bool(pg["gl_hold"])})

        result = None
        if steps > 0 and lam0 > 0:
            result = ctx.train(model, epochs, "group-lasso", lr=lr, momentum=momentum,
                               weight_decay=0.0, optimizer=make_optimizer,
                               scheduler=constant_schedule, extra_loss=penalty,
                               on_step=on_step)
        lam_end = holder["opt"].param_groups[0]["gl_lambda"] if "opt" in holder else lam0
        death = holder["opt"].param_groups[0]["gl_death"] if "opt" in holder else {}
        reached = bool(holder["opt"].param_groups[0]["gl_hold"]) if "opt" in holder else False
        with torch.no_grad():
            norms = ctx.channel_norms(model, roles=ROLES)
        scores = {}
        for gid, n in norms.items():
            n = n.double()
            if mode == "initial":
                n = n / norms0[gid].double().mean().clamp_min(1e-12)
            elif mode in ("final", "true"):
                n = n / n.mean().clamp_min(1e-12)
            sc = n.cpu().numpy()
            # exact zeros rank below every survivor, the last to die first
            when = np.asarray(death.get(str(gid), [-1.0] * len(sc)), dtype=float)
            zero = sc == 0
            sc[zero] = -1.0 + np.clip(when[zero], 0.0, None) / (steps + 2.0)
            scores[gid] = sc
        plan = ctx.land(scores, share_floors(graph, max_ratio, ctx.round_to))
        zero_mask = {gid: (n == 0).cpu().numpy() for gid, n in norms.items()}
        zeros = {gid: int(z.sum()) for gid, z in zero_mask.items()}
        zero_values = alive_cost(graph, {g: ~z for g, z in zero_mask.items()}, ev, rt)
        dropped = dropped_channels(graph, plan.keep)
        n_dropped = int(sum(len(v) for v in dropped.values()))
        dropped_zero = int(sum(int(zero_mask[g][v].sum()) for g, v in dropped.items()))
        final = torch.cat([n.double() for n in norms.values()]) if norms else torch.zeros(1)
        revived = 0
        refit = bool(s["refit"])
        sparse_accuracy = None
        if refit:
            # debias (the relaxed lasso's refit): the penalty chose the support; the
            # fine-tuning starts from the baseline's weights on it, not from the shrunk ones
            if s["evaluate"]:
                recalibrate_bn(ctx, model, int(s["bn_batches"]))
                sparse_accuracy = evaluate_plan(
                    ctx, model, plan, "group-lasso plan, shrunk weights", int(s["bn_batches"]))
            model.load_state_dict(state0)
            ctx.log("group-lasso: the plan's channels restart from the baseline's weights "
                    "(refit)")
        elif s["revive"]:
            revived = revive(graph, model, initial, norms0, norms, plan.keep)
            if revived:
                ctx.log(f"group-lasso: the target keeps {revived} channels the penalty zeroed; "
                        "they restart from their initial weights, rescaled")
        info = {
            "lambda": lam0, "lambda_final": lam_end, "schedule": "fixed" if fixed else "growing",
            "shrink": None if fixed else float(s["shrink"]), "growth": growth,
            "balance": bool(s["balance"]), "cost_weight": float(s["cost_weight"]),
            "cost_per": str(s["cost_per"]).lower(),
            "cost_pay": {str(g): float(v) for g, v in pay.items()},  # each group's weight
            "lr": lr, "momentum": momentum, "epochs": epochs, "steps": steps,
            "zeros_per_group": zeros, "zeros": int(sum(zeros.values())),
            "channels": int(final.numel()),
            "cost_without_zeros": {k: zero_values[k] for k in ("flops", "params")},
            "zeros_flops": float(graph.baseline.flops) - float(zero_values["flops"]),
            "zeros_cost_ratio": ratio(zero_values), "target_reached_by_zeros": reached or
            ratio(zero_values) <= 1.0,
            "plan_dropped": n_dropped, "plan_dropped_exact_zeros": dropped_zero,
            "plan_dropped_zero_share": dropped_zero / n_dropped if n_dropped else 1.0,
            "trace": trace,
            "initial_mean_norm": mean0, "final_mean_norm": float(final.mean()),
            "normalise": mode, "revived": revived, "refit": refit,
            "deaths_deferred": int(holder.get("deferred", 0)), "floor": rt,
            "plan_accuracy_shrunk_weights": sparse_accuracy,
            "val_accuracy_after_sparsity": result.val_accuracy if result else None,
        }
        if not refit:
            info["bn_recalibration_images"] = recalibrate_bn(ctx, model, int(s["bn_batches"]))
        if s["evaluate"]:
            info["plan_accuracy_before_finetune"] = evaluate_plan(
                ctx, model, plan, "group-lasso plan (before fine-tuning)", int(s["bn_batches"]))
        ctx.log(f"group-lasso: {info['zeros']} of {info['channels']} channels exactly zero "
                f"(cost ratio {info['zeros_cost_ratio']:.3f} of the target); the plan drops "
                f"{n_dropped}, {dropped_zero} of them exact zeros; lambda {lam0:.4g} -> "
                f"{lam_end:.4g}")
        return Proposal(plan, model.state_dict(), info)
