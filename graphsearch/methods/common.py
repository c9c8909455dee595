"""Helpers shared by several search methods (one module, so that no method imports another).

Channel-level operations on a model through the channel graph (scale, zero, the tied slices
of a group), the budget in optimizer steps (per candidate: `steps_for`), the candidate
evaluator of a search (`make_evaluator`) and the channel order the evaluator-based methods
add and drop channels in (`channel_order`, `keep_of_widths`, `importance_of`), BatchNorm re-estimation, a plan's accuracy with
its dropped channels zeroed, folding per-channel gate values into the weights, and the share
of a plan's FLOPs that the shared target step added on top of a method's own choice.
"""

from __future__ import annotations

import copy
import math
from pathlib import Path
from typing import Mapping

import numpy as np
import torch
from torch import nn

from ..errors import PlanError, UserError
from ..evaluator import CandidateEvaluator, EvalSettings
from ..graph import ChannelGraph
from ..target import CostMeter, allowed_widths
from ..passes import gates as gate_pass
from ..train import recalibrate_bn as recalibrate_bn_on
from ..train import steps_per_epoch
from .base import SearchContext
from ..units import human

ROLES = ("out", "in", "gamma", "beta")
COST_PER = ("slice", "channel")  # what a penalty's cost weight counts per (`cost_weights`)


def steps_for(ctx, evaluations: float, at_least: int = 1) -> int:
    """Optimizer steps per candidate when the search budget `ctx.epochs` (epochs of the
    training split) is split over about `evaluations` candidate fine-tunes."""
    per_epoch = max(1, steps_per_epoch(len(ctx.data.train), ctx.batch_size, None))
    return max(int(at_least), int(math.floor(ctx.epochs * per_epoch / max(evaluations, 1))))


# How every search built on the candidate evaluator scores a candidate, besides its training
# steps (each method's `--set`): adaptive BN (BatchNorm statistics re-estimated on this many
# training images before the candidate trains or is scored, EagleEye) and the validation
# samples it is scored on (a fixed draw; 0: the whole split). The defaults are the cheap score
# that ranked plans best for its cost in benchmarks/results/rank_correlation.md.
CANDIDATE_SCORING = {"candidate_bn_images": 256, "candidate_val_samples": 1000}
# `max_ratio`, the largest share of a group a method may remove (1: no cap): its bounds
MAX_RATIO = "(0, 1]"
# the bounds of the candidate settings the four candidate searches share
CANDIDATE_BOUNDS = {"candidate_bn_images": "[0, inf)", "candidate_val_samples": "[0, inf)"}
# the bounds of the strength-schedule and optimiser settings the penalty methods share
PENALTY_BOUNDS = {"lambda": "[0, inf)", "growth": "[1, inf)", "max_growth": "[1, inf)",
                  "reach": "(0, 1]", "cost_weight": "[0, inf)", "lr": "(0, inf)",
                  "momentum": "[0, 1)", "max_ratio": MAX_RATIO}


def shared_bounds(defaults: Mapping, table: Mapping) -> dict:
    """The bounds of `table` (PENALTY_BOUNDS) for the settings a method has (`defaults`)."""
    return {k: v for k, v in table.items() if k in defaults}


def candidate_scoring(settings: Mapping) -> dict:
    """`EvalSettings` keywords for the candidate score from a method's merged settings."""
    return {"bn_images": int(settings.get("candidate_bn_images",
                                          CANDIDATE_SCORING["candidate_bn_images"])),
            "val_samples": int(settings.get("candidate_val_samples",
                                            CANDIDATE_SCORING["candidate_val_samples"]))}


def make_evaluator(ctx, settings: EvalSettings, name: str, data=None,
                   data_tag: str = "") -> CandidateEvaluator:
    """The evaluator of a search: the backend from the context (`ctx.workers`, `ctx.ray`),
    the cache in `ctx.state_dir / f"evals-{name}"`; `data` (default `ctx.data`): another
    split to train and score on, named by `data_tag` in the cache key."""
    return CandidateEvaluator(ctx.graph, ctx.data if data is None else data, settings,
                              cache_dir=Path(ctx.state_dir) / f"evals-{name}",
                              workers=getattr(ctx, "workers", 1), ray=getattr(ctx, "ray", None),
                              log=ctx.log, on_result=getattr(ctx, "on_result", None),
                              data_tag=data_tag)


def channel_order(ctx) -> dict[int, np.ndarray]:
    """Per prunable group, its channels from the strongest to the weakest by the L2 norm of
    everything tied to them in the baseline (ties by index): the order in which the search
    methods built on the evaluator add or drop a group's channels."""
    with torch.no_grad():
        norms = ctx.channel_norms()
    out = {}
    for g in ctx.graph.prunable_groups:
        n = norms[g.id].double().cpu().numpy() if g.id in norms else np.zeros(g.size)
        out[g.id] = np.lexsort((np.arange(g.size), -n))
    return out


def keep_of_widths(graph: ChannelGraph, order: Mapping[int, np.ndarray],
                   widths: Mapping[int, int]) -> dict[int, list[int]]:
    """The plan keeping the first `widths[g]` channels of `order[g]` (changed groups only)."""
    keep = {}
    for gid, w in widths.items():
        size = graph.groups[gid].size
        if int(w) < size:
            keep[int(gid)] = sorted(int(i) for i in order[gid][:int(w)])
    return keep


def importance_of(order: Mapping[int, np.ndarray]) -> dict[int, np.ndarray]:
    """Scores whose descending order is `order` (for `ctx.land_widths`)."""
    out = {}
    for gid, o in order.items():
        s = np.empty(len(o))
        s[np.asarray(o)] = -np.arange(len(o), dtype=float)
        out[gid] = s
    return out


def channel_savings(graph: ChannelGraph, metric: str = "flops",
                    meter: CostMeter | None = None) -> dict[int, float]:
    """Per prunable group of more than one channel: how much of `metric` removing one of its
    channels saves from the baseline (costs are bilinear in the widths, so this is the
    baseline's marginal cost of one channel). `meter` measures latency where that is the
    metric; FLOPs, MACs and params come from the graph's cost model."""
    meter = meter or CostMeter(graph, [])
    full = meter.measure({})[metric]
    return {g.id: max(full - meter.measure({g.id: g.size - 1})[metric], 0.0)
            for g in graph.prunable_groups if g.size > 1}


def binding_metric(ctx) -> str:
    """The metric of the constraint the baseline is furthest above (the one a plan must
    move most)."""
    meter = CostMeter(ctx.graph, ctx.constraints, ctx.latency_model)
    full = meter.measure({})
    return max(ctx.constraints, key=lambda c: full[c.metric] / max(c.limit, 1e-30)).metric \
        if ctx.constraints else "flops"


def cost_weights(ctx, power: float, per: str = "channel", name: str = "") -> dict[int, float]:
    """Per prunable group: what one of its channels costs in the binding target's metric
    relative to the mean over the groups, to the power `power` (0: 1.0 everywhere). A
    penalty scaled by it asks an expensive channel to be worth more to survive, as
    MorphNet's FLOP regulariser does; without it a penalty that treats every channel alike
    gives a FLOPs target the cheap channels (a low-resolution stage's, rich in parameters)
    as readily as the expensive ones (measured on CIFAR ResNet-20: group lasso and
    variational dropout kept 83k and 52k parameters at 1/3 FLOPs where uniform widths keep
    108k, and both ended below uniform after the same fine-tune; cifar10_table.md).
    Groups whose channel saves nothing get the smallest positive weight. `per` "slice" (the
    methods' `cost_per` setting) divides a channel's cost by the weight tensors it is tied to
    (`weight_ties`): a residual stream's channel, in a dozen convolutions, then pays what one
    of its convolutions' channels costs, not the dozen's sum; "channel" (the default) does not."""
    per = str(per).lower()
    if per not in COST_PER:
        raise UserError(f"{name + ': ' if name else ''}cost_per={per!r}; use channel (a "
                        "channel's cost) or slice (its cost per tied weight tensor)")
    groups = [g.id for g in ctx.graph.prunable_groups]
    if not power:
        return {gid: 1.0 for gid in groups}
    metric = binding_metric(ctx)
    save = channel_savings(ctx.graph, metric,
                           CostMeter(ctx.graph, ctx.constraints, ctx.latency_model))
    if per == "slice":
        ties = weight_ties(ctx.graph, ctx.model)
        save = {g: v / ties.get(g, 1) for g, v in save.items()}
    positive = [v for v in save.values() if v > 0]
    if not positive:
        return {gid: 1.0 for gid in groups}
    mean, low = float(np.mean(positive)), float(min(positive))
    return {gid: (max(save.get(gid, 0.0), low) / mean) ** float(power) for gid in groups}


def weight_ties(graph: ChannelGraph, model: nn.Module) -> dict[int, int]:
    """Per prunable group, how many weight tensors (a conv's or linear's, two dimensions or
    more) one of its channels is a row or a column of."""
    params = dict(model.named_parameters())
    tied = graph.tied_parameters()
    return {g.id: max(1, len({s.name for s in tied[g.id]
                             if s.role in ("out", "in") and s.name in params
                             and params[s.name].dim() >= 2}))
            for g in graph.prunable_groups}


def budget_steps(ctx: SearchContext, epochs: float) -> int:
    """Optimizer steps that `ctx.train(model, epochs, ...)` takes (its `max_steps`)."""
    return ctx.budget_steps(epochs)


def constant_schedule(opt: torch.optim.Optimizer, total_steps: int):
    """A constant learning rate (scheduler factory for `train`)."""
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)


def tied_by_param(graph: ChannelGraph, model: nn.Module, roles=ROLES):
    """Per prunable group, its (parameter, dim, positions, channels) slices with those roles."""
    params = dict(model.named_parameters())
    out: dict[int, list[tuple[str, torch.Tensor, int, torch.Tensor, torch.Tensor]]] = {}
    tied = graph.tied_parameters()
    for g in graph.prunable_groups:
        for s in tied[g.id]:
            if s.is_buffer or s.role not in roles or s.name not in params:
                continue
            p = params[s.name]
            out.setdefault(g.id, []).append(
                (s.name, p, s.dim, torch.as_tensor(s.positions, device=p.device),
                 torch.as_tensor(s.channels, device=p.device)))
    return out


@torch.no_grad()
def scale_channels(graph: ChannelGraph, model: nn.Module, factors: Mapping[int, torch.Tensor],
                   optimizer: torch.optim.Optimizer | None = None, roles=ROLES) -> None:
    """Multiply every tied slice of channel c of group g by `factors[g][c]`, in place; where
    a factor is 0, also zero the optimizer's momentum there (dead stays dead)."""
    mults: dict[tuple[str, int], tuple[torch.Tensor, torch.Tensor]] = {}
    for gid, slices in tied_by_param(graph, model, roles).items():
        if gid not in factors:
            continue
        f = factors[gid]
        for name, p, dim, pos, ch in slices:
            key = (name, dim)
            if key not in mults:
                mults[key] = (p, torch.ones(p.shape[dim], dtype=p.dtype, device=p.device))
            mults[key][1][pos] = f.to(p.device, p.dtype)[ch]
    for (name, dim), (p, m) in mults.items():
        shape = [1] * p.dim()
        shape[dim] = -1
        p.mul_(m.view(shape))
        if optimizer is not None:
            buf = optimizer.state.get(p, {}).get("momentum_buffer")
            if buf is not None:
                buf.mul_((m != 0).to(buf.dtype).view(shape))


def zero_channels(graph: ChannelGraph, model: nn.Module, drop: Mapping[int, np.ndarray],
                  optimizer: torch.optim.Optimizer | None = None) -> None:
    """Zero everything tied to the channels `drop[g]` (and their momentum)."""
    factors = {}
    for gid, idx in drop.items():
        f = torch.ones(graph.groups[gid].size)
        f[torch.as_tensor(np.asarray(idx, dtype=np.int64))] = 0.0
        factors[gid] = f
    scale_channels(graph, model, factors, optimizer)


def dropped_channels(graph: ChannelGraph, keep: Mapping[int, list[int]]) -> dict[int, np.ndarray]:
    return {gid: np.setdiff1d(np.arange(graph.groups[gid].size), np.asarray(k, dtype=np.int64))
            for gid, k in keep.items()}


@torch.no_grad()
def recalibrate_bn(ctx: SearchContext, model: nn.Module, batches: int) -> int:
    """Re-estimate the BatchNorm running statistics of `model` from `batches` training batches
    (`graphsearch.train.recalibrate_bn`). Needed after a search phase that moved the weights'
    scale faster than the running averages follow (a proximal shrink), and for channels
    revived from zero. Returns the number of images used."""
    return recalibrate_bn_on(model, getattr(ctx.data, "train", None), batches * ctx.batch_size,
                             ctx.batch_size, ctx.seed, rules=ctx.graph.rules)


def evaluate_plan(ctx: SearchContext, model: nn.Module, plan, label: str,
                  bn_batches: int = 0) -> float | None:
    """Validation accuracy of `model` with the plan's dropped channels zeroed (what the slim
    model computes before fine-tuning, up to the BN beta of a removed branch's last layer,
    which the slim model drops with the branch), with its BN statistics re-estimated if
    `bn_batches`; recorded as a candidate for the trade-off plot."""
    val = getattr(ctx.data, "val", None)
    if val is None or len(val) == 0:
        return None
    masked = copy.deepcopy(model)
    zero_channels(ctx.graph, masked, dropped_channels(ctx.graph, plan.keep))
    recalibrate_bn(ctx, masked, bn_batches)
    acc = float(ctx.evaluate(masked))
    ctx.candidates.append({"flops": float(plan.achieved["flops"]), "accuracy": acc,
                           "label": label})
    return acc


def fold_gates(ctx: SearchContext, values: dict[int, torch.Tensor],
               model: nn.Module | None = None) -> list[str]:
    """Multiply, in place, the parameters of `model` (default `ctx.model`) at each gate site
    by the gate values (`passes.gates.fold_gates`), so that the plain model computes what
    `ctx.gated` computes with these constant gates. Returns the gate sites that hold no
    parameter to fold into; empty when the folding is exact."""
    return gate_pass.fold_gates(ctx.model_graph(), model if model is not None else ctx.model,
                                values)


def added_share(graph: ChannelGraph, chosen: Mapping[int, list[int] | np.ndarray],
                plan) -> dict:
    """How much of the final plan the shared target step added on top of the method's own
    choice `chosen` (group -> kept indices, every prunable group): the channels the plan keeps
    outside it, and the FLOPs share they bring (1 - cost(plan & chosen) / cost(plan))."""
    full = {g.id: np.arange(g.size) for g in graph.prunable_groups}
    both, added = {}, 0
    for g in graph.prunable_groups:
        own = np.asarray(chosen.get(g.id, full[g.id]), dtype=np.int64)
        kept = np.asarray(plan.keep.get(g.id, full[g.id]), dtype=np.int64)
        inter = np.intersect1d(kept, own)
        added += int(len(kept) - len(inter))
        if len(inter) < g.size:
            both[g.id] = inter.tolist()
    flops = float(plan.achieved["flops"])
    try:
        inner = float(graph.cost(both).flops)
    except Exception:  # noqa: BLE001 - the intersection may not be a legal plan
        inner = float("nan")
    share = 1.0 - inner / flops if flops > 0 and np.isfinite(inner) else float("nan")
    return {"channels_added": added, "flops_share_added": max(0.0, share)
            if np.isfinite(share) else share}


def realisable(graph: ChannelGraph, alive: Mapping[int, np.ndarray]) -> bool:
    """Whether keeping only the `alive` channels is a plan the graph can realise (no group
    under its minimum width, nothing the output needs emptied)."""
    keep = {}
    for g in graph.prunable_groups:
        idx = np.flatnonzero(alive[g.id]) if g.id in alive else None
        if idx is None or len(idx) == g.size:
            continue
        if len(idx) < allowed_widths(g.size, g.min_width, 1)[0]:
            return False
        keep[g.id] = idx.tolist()
    try:
        graph.removal(keep)
    except PlanError:
        return False
    return True


def min_plan_width(group, round_to: int) -> int:
    """The smallest nonzero width a plan with widths in multiples of `round_to` can give the
    group (its whole size where that is smaller)."""
    a = allowed_widths(group.size, group.min_width, max(1, int(round_to)))
    return int(a[a > 0][0])


def share_floor(group, max_ratio: float, round_to: int) -> int:
    """The least width a group keeps when a method may remove at most the share `max_ratio`
    of it (`--set max_ratio=...`, as magnitude's Torch-Pruning cap): the smallest width in
    multiples of `round_to` at or above `(1 - max_ratio) * size`; 0 without a cap (1.0)."""
    if max_ratio >= 1.0:
        return 0
    need = int(np.ceil((1.0 - max_ratio) * group.size - 1e-9))
    a = allowed_widths(group.size, group.min_width, max(1, int(round_to)))
    return int(a[a >= need][0])


def share_floors(graph: ChannelGraph, max_ratio: float, round_to: int) -> dict[int, int] | None:
    """Per prunable group, its `share_floor` (the target step's `least`); None without a cap
    (`max_ratio` 1)."""
    if max_ratio >= 1.0:
        return None
    return {g.id: share_floor(g, max_ratio, round_to) for g in graph.prunable_groups}


def spare_under_floor(graph: ChannelGraph, alive: Mapping[int, np.ndarray],
                      dying: Mapping[int, np.ndarray], urgency: Mapping[int, np.ndarray],
                      round_to: int, max_ratio: float = 1.0) -> dict[int, np.ndarray]:
    """The deaths that leave no group the graph cannot remove (a stream, a stem) with fewer
    alive channels than the smallest width a plan in multiples of `round_to` keeps: the
    least urgent of a group's dying are spared down to that floor. With widths in multiples
    of 8 such a death buys nothing (the landing keeps 8 channels whatever died) and it cuts
    the signal the rest of the network is still training on (measured on CIFAR ResNet-20
    with a cost-weighted group lasso: 15 of the stem's 16 channels died and the network's
    validation top-1 fell to 18% while the penalty was still choosing). With `max_ratio`
    below 1, no group (removable ones included) goes under its `share_floor` either."""
    out = {g: np.asarray(d, dtype=bool).copy() for g, d in dying.items()}
    for g in graph.prunable_groups:
        if g.id not in out:
            continue
        least = min_plan_width(g, round_to) if g.min_width > 0 else 0
        least = max(least, share_floor(g, max_ratio, round_to))
        if least <= 0:
            continue
        left = int(np.count_nonzero(alive[g.id])) - int(np.count_nonzero(out[g.id]))
        short = least - left
        if short <= 0:
            continue
        idx = np.flatnonzero(out[g.id])
        spare = idx[np.argsort(-np.asarray(urgency[g.id])[idx], kind="stable")][:short]
        out[g.id][spare] = False
    return out


def alive_cost(graph: ChannelGraph, alive: Mapping[int, np.ndarray], ev,
               round_to: int = 1) -> dict:
    """The cost of keeping only the `alive` channels (a group left empty that the graph
    cannot remove, or under its minimum width, is counted at its smallest allowed width;
    with `round_to`, a group is counted at the width the landing will keep: its alive count
    rounded up to the next multiple (or its whole size), never under the smallest nonzero
    multiple. Counted at the alive channels alone (CIFAR ResNet-20, group lasso: 11 alive
    channels of a 32-channel group are 16 in the plan), the zeros met the target while the
    plan did not, and the landing took the difference from the survivors by score: a
    third-stage convolution that had lost no channel went from 64 to 40)."""

    keep = {}
    for g in graph.prunable_groups:
        idx = np.flatnonzero(alive[g.id])
        a = allowed_widths(g.size, g.min_width, 1)
        least = min_plan_width(g, round_to)
        if len(idx) < a[0]:
            idx = np.arange(int(a[0]))
        if 0 < len(idx) < least:
            idx = np.arange(least)
        elif round_to > 1 and 0 < len(idx) < g.size:
            # the landing's filler is counted too (which channels does not change the cost)
            w = allowed_widths(g.size, g.min_width, int(round_to))
            w = int(w[np.searchsorted(w, len(idx))])
            dead = np.flatnonzero(~np.asarray(alive[g.id], dtype=bool))
            idx = np.sort(np.concatenate([idx, dead[:w - len(idx)]]))
        if len(idx) < g.size:
            keep[g.id] = idx.tolist()
    counts = {gid: len(v) for gid, v in keep.items()}
    for trial in (keep, counts, {gid: max(1, n) for gid, n in counts.items()}):
        try:
            return ev.measure(trial)
        except PlanError:
            # an index-level plan the graph cannot realise (a split part left empty): count
            # widths instead, then with every group at one channel at least
            continue
    return ev.measure({})


def _pct(x) -> str:
    return "n/a" if x is None or (isinstance(x, float) and not np.isfinite(x)) \
        else f"{100 * float(x):.1f}%"


def method_evidence(method: str, info: dict) -> str | None:
    """One paragraph for report.md: the figures that show the method's own signal decided
    the plan (or a warning where it did not). None for methods without a signal."""
    i = info or {}
    try:
        if method == "group-lasso" and "zeros" in i:
            text = (f"The sparsity phase ({i['steps']} proximal steps, lambda "
                    f"{i['lambda']:.3g} -> {i.get('lambda_final', i['lambda']):.3g}"
                    + (f", each channel's threshold weighted by its cost ^ {i['cost_weight']:g}"
                       if i.get("cost_weight") else "") + ") left "
                    f"{i['zeros']} of {i['channels']} channels exactly zero, worth "
                    f"{human(i.get('zeros_flops', 0), 'FLOPs')}; without them the model costs "
                    f"{i.get('zeros_cost_ratio', float('nan')):.3f} of the target. Of the "
                    f"{i.get('plan_dropped', 0)} channels the plan drops, "
                    f"{i.get('plan_dropped_exact_zeros', 0)} "
                    f"({_pct(i.get('plan_dropped_zero_share'))}) are exact zeros. "
                    + (f"Deaths were deferred {i.get('deaths_deferred', 0)} times (channel-"
                       "steps) to keep to the strength schedule's path. "
                       if "deaths_deferred" in i else "")
                    + ("The plan's channels restart from the baseline's weights (refit)."
                       if i.get("refit") else
                       f"{i.get('revived', 0)} zeroed channels are kept and restart from their "
                       "initial weights."))
            if i["zeros"] == 0:
                text += (" WARNING: no channel reached zero, so the plan is the ranking of "
                         "the shrunk norms (close to magnitude's), not the penalty's choice.")
            return text
        if method == "morphnet" and "alive_widths" in i:
            widths = ", ".join(f"{g}: {w}" for g, w in i["alive_widths"].items())
            text = (f"The shrink phase ({i['steps_per_round']} steps per round, lambda "
                    f"{i['lambda']:.3g} -> {i.get('lambda_final', i['lambda']):.3g}) killed "
                    f"{i.get('channels_died', 0)} of {i.get('channels_with_gamma', 0)} channels "
                    f"(|gamma| <= {i['threshold']:g}); the alive widths cost "
                    f"{i.get('alive_cost_ratio', float('nan')):.3f} of the target. Alive widths "
                    f"before expand (group: width): {widths}. The expand step (one multiplier) "
                    f"added {_pct(i.get('expand_added_flops_share'))} of the final FLOPs."
                    + (" The plan's channels restart from the baseline's weights (refit)."
                       if i.get("refit") else ""))
            if i.get("warning"):
                text += " WARNING: " + i["warning"] + "."
            return text
        if method == "vardrop" and "dropped_total" in i:
            text = (f"{i['dropped_total']} of {i['channels_total']} channels crossed the drop "
                    f"threshold (log alpha >= 3) after {i['steps']} steps with per-sample "
                    "noise" + (f", each channel's KL weighted by its cost ^ {i['cost_weight']:g}"
                               if i.get("cost_weight") else "")
                    + (f", the KL's strength grown to x{i['strength_final']:.3g} while the "
                       "drops lagged the path to the target"
                       if i.get("schedule") == "growing" and "strength_final" in i else "")
                    + (f"; the channels left under it cost "
                       f"{_pct(i['drop_rule_cost']['flops'] / i['target_flops'])} of the "
                       "target's FLOPs" if isinstance(i.get("drop_rule_cost"), dict)
                       and i.get("target_flops") else "")
                    + "; the target step ranks channels by log alpha.")
            if i["dropped_total"] == 0:
                text += (" WARNING: no channel crossed the threshold: the KL term did not "
                         "separate the channels within this budget.")
            return text
        if method == "gensynth" and "cycles_run" in i:
            per = i.get("children_per_cycle") or []
            ns = i.get("chosen_netscore")
            return (f"{i['cycles_run']} cycles with {', '.join(map(str, per)) or 0} children "
                    f"each; the last parent (NetScore {ns:.2f}, top-1 "
                    f"{_pct(i.get('chosen_accuracy'))} on the validation split) "
                    f"{'meets' if i.get('targets_met_by_parent') else 'does not meet'} the "
                    f"targets; the shared target step added "
                    f"{_pct(i.get('shared_step_added_flops_share'))} of the final FLOPs "
                    f"({i.get('shared_step_added_channels', 0)} channels the generator had "
                    f"dropped). Selection per cycle: {'; '.join(i.get('selection', []))}."
                    if ns is not None else f"{i['cycles_run']} cycles; no parent chosen.")
    except (KeyError, TypeError, ValueError):
        return None
    return None


def strength_path(ctx: SearchContext, settings: Mapping, steps: int):
    """What group lasso's and MorphNet's growing strength share: the cost evaluator, the cost
    ratio to the binding target, the full model's ratio, the reach window and the growth factor
    per step (`growth`, or `max_growth` spread over `reach` of the steps)."""
    ev = CostMeter(ctx.graph, ctx.constraints, ctx.latency_model)

    def ratio(values) -> float:
        return max(values[c.metric] / c.limit for c in ctx.constraints)

    reach = float(settings["reach"])
    growth = float(settings["growth"]) if settings["growth"] is not None else \
        float(settings["max_growth"]) ** (1.0 / max(1.0, reach * steps))
    return ev, ratio, ratio(ev.measure({})), reach, growth


def path_ratio(r0: float, goal: float, f: float, reach: float, start: float = 0.0) -> float:
    """The strength schedules' straight path (group lasso, MorphNet, vardrop): the cost ratio
    wanted at fraction `f` of the steps, from `r0` at `start` to `goal` at `reach`."""
    return r0 - (r0 - goal) * min(1.0, max(0.0, f - start) / max(reach - start, 1e-9))


def cap_deaths(graph: ChannelGraph, ev, ratio, alive: Mapping[int, np.ndarray],
               dying: Mapping[int, np.ndarray], urgency: Mapping[int, np.ndarray],
               floor: float, round_to: int = 1) -> dict[int, np.ndarray]:
    """Which of the channels a proximal step would kill may die now. `alive[g]` and
    `dying[g]` are boolean per channel (dying implies alive), `urgency[g]` orders the dying
    (smaller: deeper below the threshold, dies first), `ratio(values)` is the cost ratio to
    the target. The deaths are allowed in that order while the cost of what stays alive is at
    least `floor` times the target (the path of the strength schedule, never below the
    target itself); the rest are deferred (the caller leaves them untouched this step), so a
    step that would kill a whole group's concentrated norms at once cannot overshoot the path
    (measured on CIFAR ResNet-20: without the cap one step zeroed 85% of the channels).
    Deaths that would leave the survivors a plan the graph cannot realise (every channel of
    a stage's branches, a part of a channel split) wait too: a penalty that empties what the
    model needs cuts its signal, and no plan can then be landed on its zeros (measured on
    ShuffleNet-V2 with a cost-weighted group lasso: one step emptied a whole stage).
    `floor` -inf: only that legality check. The cost counts widths as a plan in multiples of
    `round_to` keeps them (`alive_cost`). Returns the allowed deaths, boolean per group."""
    order = [(float(urgency[g][c]), g, int(c)) for g, d in dying.items()
             for c in np.flatnonzero(d)]
    if not order:
        return {g: np.zeros_like(d, dtype=bool) for g, d in dying.items()}
    order.sort()

    def after(k: int) -> dict[int, np.ndarray]:
        out = {g: np.asarray(a, dtype=bool).copy() for g, a in alive.items()}
        for _, g, c in order[:k]:
            out[g][c] = False
        return out

    def ok(k: int) -> bool:
        left = after(k)
        if floor > -np.inf and ratio(alive_cost(graph, left, ev, round_to)) < floor:
            return False
        return realisable(graph, left)

    if ok(len(order)):
        k = len(order)
    else:  # the largest prefix that keeps the cost at or above the floor (bisection)
        lo, hi = 0, len(order)  # ok(lo) holds, ok(hi) fails
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if ok(mid):
                lo = mid
            else:
                hi = mid
        k = lo
        # legality is not monotone in the prefix: step back to one that holds
        while k > 0 and not ok(k):
            k -= 1
    allowed = {g: np.zeros_like(np.asarray(d), dtype=bool) for g, d in dying.items()}
    for _, g, c in order[:k]:
        allowed[g][c] = True
    return allowed

