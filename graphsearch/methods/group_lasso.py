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

Defaults (METHODS.md: lr 1e-3, momentum 0.9, no L2 decay, lambda about 3e-3 from a trained
baseline over a long sparsity phase). The pipeline's search budget is short (`--search-epochs`,
a few hundred steps): with the published lambda the proximal steps would shrink a channel's
norm by `lambda * sum_t lr_t`, about 1e-3 of a typical norm of 1-3, and zero nothing. So by
default lambda is scaled to the problem: the total shrinkage over the budget,
`lambda * sum_t lr_t` (constant lr: `lambda * lr * steps`), is `shrink` (default 0.3) times
the mean initial joint channel norm. A channel the task loss does not defend goes to exactly
zero; the others shrink, more than 30% where two groups share a weight (a conv's weight is
the rows of one group and the columns of another, and both proximal factors apply): on the
trained ResNet-20 with 314 steps the mean norm fell by 48% and no channel reached zero, so
the ranking, not the zeros, decides the plan at this budget.
An earlier default set the shrinkage to the 25% quantile of the norms; on a trained CIFAR
ResNet-20 (norms tightly spread, 314 steps) that was 80% of the mean norm, zeroed 334 of 448
channels and left 12% validation accuracy, so the plan could not recover in fine-tuning
(37.9% against uniform's 68.3%). `--set lambda=...` gives lambda directly.

Scores are the final joint norms divided by their group's mean final norm (`normalise`
"final", the default), as `magnitude` does: layers of different fan-in then compete on one
scale, and within a group the penalty's ranking decides. Measured on CIFAR-10 (ResNet-20,
1/3 FLOPs, `benchmarks/results/cifar10_table.md`): "final" 71.6% after fine-tuning; "initial"
(divide by the group's mean *initial* norm, meant to let a group the penalty shrank as a whole
rank low) 66.1%, because the proximal threshold is absolute: a residual group's joint norm
gathers many tied slices, shrinks relatively least, and kept all its channels while the
block-inner convs fell to 3-7 of 64; raw norms ("none") were worse still (37.9% with the old
lambda). `--set normalise=initial|none` gives the other rankings.
"""

from __future__ import annotations

import copy
from typing import Mapping

import numpy as np
import torch
from torch import nn

from ..graph import ChannelGraph
from .base import Method, Proposal, SearchContext

ROLES = ("out", "in", "gamma", "beta")


# --------------------------------------------------------------------------- shared helpers


def budget_steps(ctx: SearchContext, epochs: float) -> int:
    """Optimizer steps that `ctx.train(model, epochs, ...)` takes (its `max_steps`)."""
    steps_per_epoch = max(1, -(-len(ctx.data.train) // ctx.batch_size))
    return max(1, int(round(epochs * steps_per_epoch)))


def constant_schedule(opt: torch.optim.Optimizer, total_steps: int):
    """A constant learning rate (scheduler factory for `train`)."""
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)


def _tied_by_param(graph: ChannelGraph, model: nn.Module, roles=ROLES):
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
    for gid, slices in _tied_by_param(graph, model, roles).items():
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
    (no augmentation, exact averages). Needed after a search phase that moved the weights'
    scale faster than the running averages follow (a proximal shrink), and for channels
    revived from zero. Returns the number of images used."""
    bns = [m for m in model.modules()
           if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    ds = getattr(ctx.data, "train", None)
    if not bns or batches <= 0 or ds is None or len(ds) < 2:
        return 0
    gen = torch.Generator().manual_seed(int(ctx.seed))
    idx = torch.randperm(len(ds), generator=gen)[: batches * ctx.batch_size]
    p = next(iter(model.parameters()), None)
    device = p.device if p is not None else torch.device("cpu")
    saved = [(m, m.momentum) for m in bns]
    was = model.training
    used = 0
    try:
        for m in bns:
            m.reset_running_stats()
            m.momentum = None  # cumulative average
        model.train()
        for chunk in idx.split(ctx.batch_size):
            if len(chunk) < 2:
                continue
            if callable(getattr(ds, "get_batch", None)):
                x, _ = ds.get_batch(chunk, augment=False, device=device)
            else:
                x = torch.stack([ds[int(i)][0] for i in chunk]).to(device)
            model(x)
            used += len(chunk)
    finally:
        for m, mom in saved:
            m.momentum = mom
        model.train(was)
    return used


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
    for gid, slices in _tied_by_param(graph, model).items():
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
               "for exact zeros, then channels ranked by joint norm")
    cost = "one sparsity phase of --search-epochs (proximal SGD), then the fine-tuning"
    defaults = {
        "lambda": None,  # None: lambda * sum_t lr_t = `shrink` x the mean initial norm
        "shrink": 0.3,
        "lr": 1e-3,  # METHODS.md, from a trained baseline
        "momentum": 0.9,
        "normalise": "final",  # "final", "initial" or "none" (module docstring)
        "revive": True,  # kept channels that are exactly zero get their rescaled initial weights
        "bn_batches": 20,  # batches to re-estimate BN statistics after the sparsity phase
        "evaluate": True,  # record the plan's accuracy (dropped channels zeroed) as a candidate
    }

    def search(self, ctx: SearchContext) -> Proposal:
        s = {**self.defaults, **ctx.settings}
        mode = str(s["normalise"]).lower()
        if mode not in ("initial", "final", "none", "true", "false"):
            from ..load import UserError

            raise UserError(f"group-lasso: normalise={s['normalise']!r}; use initial, final "
                            "or none")
        model = ctx.model
        lr, momentum = float(s["lr"]), float(s["momentum"])
        epochs = float(ctx.epochs)
        steps = budget_steps(ctx, epochs) if epochs > 0 else 0
        with torch.no_grad():
            norms0 = ctx.channel_norms(model, roles=ROLES)
            initial = {k: v.detach().clone() for k, v in model.named_parameters()}
        all0 = torch.cat([n.double() for n in norms0.values()]) if norms0 else torch.zeros(1)
        mean0 = float(all0.mean())
        if s["lambda"] is not None:
            lam = float(s["lambda"])
        else:
            lam = float(s["shrink"]) * mean0 / max(lr * steps, 1e-12)  # sum_t lr_t = lr * steps
        ctx.log(f"group-lasso: lambda {lam:.4g} (mean initial channel norm {mean0:.4g}, "
                f"{steps} steps at lr {lr:g})")

        holder: dict = {}

        def make_optimizer(m: nn.Module) -> torch.optim.Optimizer:
            opt = torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=lr,
                                  momentum=momentum, weight_decay=0.0)
            holder["opt"] = opt
            return opt

        def penalty(m: nn.Module) -> torch.Tensor:
            # Logged only (detached): the proximal step applies the penalty.
            with torch.no_grad():
                n = ctx.channel_norms(m, roles=ROLES)
                return lam * sum(v.sum() for v in n.values()) if n else torch.zeros(())

        def on_step(m: nn.Module, step: int) -> None:
            opt = holder["opt"]
            lr_t = opt.param_groups[0]["lr"]  # constant schedule: the lr just used
            proximal_step(ctx, m, lr_t * lam, opt)

        result = None
        if steps > 0 and lam > 0:
            result = ctx.train(model, epochs, "group-lasso", lr=lr, momentum=momentum,
                               weight_decay=0.0, optimizer=make_optimizer,
                               scheduler=constant_schedule, extra_loss=penalty,
                               on_step=on_step)
        with torch.no_grad():
            norms = ctx.channel_norms(model, roles=ROLES)
        scores = {}
        for gid, n in norms.items():
            n = n.double()
            if mode == "initial":
                n = n / norms0[gid].double().mean().clamp_min(1e-12)
            elif mode in ("final", "true"):
                n = n / n.mean().clamp_min(1e-12)
            scores[gid] = n.cpu().numpy()
        plan = ctx.land(scores)
        zeros = {gid: int((n == 0).sum()) for gid, n in norms.items()}
        final = torch.cat([n.double() for n in norms.values()]) if norms else torch.zeros(1)
        revived = 0
        if s["revive"]:
            revived = revive(ctx.graph, model, initial, norms0, norms, plan.keep)
            if revived:
                ctx.log(f"group-lasso: the target keeps {revived} channels the penalty zeroed; "
                        "they restart from their initial weights, rescaled")
        info = {
            "lambda": lam, "shrink": None if s["lambda"] is not None else float(s["shrink"]),
            "lr": lr, "momentum": momentum, "epochs": epochs, "steps": steps,
            "zeros_per_group": zeros, "zeros": int(sum(zeros.values())),
            "channels": int(final.numel()),
            "initial_mean_norm": mean0, "final_mean_norm": float(final.mean()),
            "normalise": mode, "revived": revived,
            "val_accuracy_after_sparsity": result.val_accuracy if result else None,
        }
        info["bn_recalibration_images"] = recalibrate_bn(ctx, model, int(s["bn_batches"]))
        if s["evaluate"]:
            info["plan_accuracy_before_finetune"] = evaluate_plan(
                ctx, model, plan, "group-lasso plan (before fine-tuning)", int(s["bn_batches"]))
        ctx.log(f"group-lasso: {info['zeros']} of {info['channels']} channels exactly zero; "
                f"mean norm {mean0:.4g} -> {info['final_mean_norm']:.4g}")
        return Proposal(plan, model.state_dict(), info)
