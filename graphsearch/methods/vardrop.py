"""`vardrop`: structured variational dropout, one Gaussian gate per coupled channel.

METHODS.md section 2 (Molchanov et al. 2017, structured per channel). Every prunable group
gets one multiplicative gate per channel, shared by every producer of the group (`ctx.gated`
places it after the norm that follows each conv/linear, or after the producer):

    z_c ~ N(theta_c, sigma_c^2),  theta init 1, log sigma^2 init -10,
    log alpha_c = clip(log sigma^2_c - log theta_c^2, -8, 8),
    -KL_c = k1 sigmoid(k2 + k3 log alpha_c) - 0.5 log1p(exp(-log alpha_c)) - k1.

Choices, and why:

- Additive reparameterisation: `theta` and `log sigma^2` are independent parameters and
  `z = theta + sigma * eps`, so the gradient of `theta` does not carry the noise scale.
- Per-sample noise (the local reparameterisation the paper relies on): the gate multiplies
  the channel's pre-activation, and `eps` is drawn for every sample and channel (`(B, size)`
  gates), so the noise on the gate outputs is independent across the batch. One draw shared
  by the whole batch (an earlier version) gives the same expectation but a gradient variance
  that does not shrink with the batch, which is what the local reparameterisation removes.
- Loss: mean CE + beta_t * sum KL / N, N = size of the training split. It is the paper's
  `(N/M) sum_batch CE + beta_t sum KL` divided by N (same minimiser, and it keeps the task
  loss on the scale the training loop reports); plain mean CE + KL would be N times too strong.
- Clip with a straight-through gradient (`straight_through=True`): with theta = 1 and
  log sigma^2 = -10 every gate starts at log alpha = -10, under the -8 clip, where a hard
  clamp has zero gradient and the KL term could never act. The forward value is clipped as
  written; the backward pass treats the clip as the identity.
- Optimiser: Adam, as in the paper, with two parameter groups: the network weights (`lr`,
  1e-3, no L2) and the gates (`gate_lr`, no L2: weight decay would pull log sigma^2 from -10
  towards 0). Adam moves log sigma^2 by about `gate_lr` per step whatever the 1/N scale of
  the KL gradient. The paper trains for hundreds of epochs; with a fixed 1e-2 and the
  pipeline's budget (314 steps on 20k CIFAR images, 2 epochs) log alpha never left the -8
  clip: every channel tied and the ranking was noise. So by default (`gate_lr` None) it is
  scaled to the budget: `max(1e-2, 12 / steps after the warm-up starts)`, enough for an
  undefended channel to travel from log alpha -10 past the drop threshold 3.
- KL warm-up: the paper's beta = 0 for 5 epochs, linear to 1 by epoch 20, is scaled to the
  search budget as fractions of its steps: beta = 0 for the first `warmup_start` = 15%,
  linear to 1 at `warmup_end` = 60% (start = end / 4, as 5/20), then 40% at full strength.
- Cost-weighted KL (`cost_weight`, 1 by default; 0: the paper's): each channel's KL term is
  scaled by what one channel of its group costs in the target's metric relative to the mean
  channel (`common.cost_weights`), a prior that asks an expensive channel for more evidence.
  With the paper's uniform KL a FLOPs target took the cheap, parameter-rich channels of the
  low-resolution stage first: 52k parameters kept at 1/3 FLOPs on CIFAR ResNet-20 (uniform
  widths keep 108k) and 2.4 points under uniform after the same fine-tune.
- That cost per tied weight tensor (`cost_per` "slice", the default since the twenty-first
  session; "channel" before; `common.cost_weights`): per channel, a residual stream's channel,
  a row or column of every convolution on the stream, paid 4.5-5.4 times its stage's inner
  channels on CIFAR ResNet-32, and the gates dropped the first and second stages' streams to
  8 of 16 and 8 of 32 (84.70% validation top-1 after the fine-tune; 84.82% at
  `cost_weight=0.5`, 84.96% capped at `max_ratio=0.7`; uniform widths 84.28-84.80). Per tied
  weight tensor the plan keeps the streams at 16, 24 and 56, thins the inner convolutions
  (8 in the first two stages, 16-40 in the third), removes one block, 163,834 parameters, and
  scores 85.52% validation (86.04% test; one fine-tuning seed): 0.7 above uniform's highest
  seed, level with magnitude (85.48-85.86) (`cifar10_table.md`, twenty-first session); a
  second search seed keeps all 15 blocks (streams 8, 24, 56) and scores 86.34% (86.78%).
  On CIFAR ResNet-20 (116-epoch baseline) 85.24% validation (85.26% test) against 83.46%
  (84.32%) per channel: at the top of uniform's and magnitude's ranges.
- KL strength (`schedule` "growing", the default; "fixed": the paper's 1): even with the
  budget-scaled gate lr, the paper's sum KL / N moved no gate past the drop threshold in the
  pipeline's budget (CIFAR ResNet-20, 126 steps: 0 of 448, log alpha median -8), so the plan
  was the landing's order of log alphas still under the clip. The KL term is multiplied by a
  strength that follows the schedule group lasso and MorphNet use (`common.strength_path`):
  from the warm-up's start it grows by a factor per step (`max_growth` 1e4 spread over the
  steps up to `reach`, by default the warm-up's end) while the cost of the channels not
  dropped lags a straight path from the baseline's cost to the target's, and eases off
  (never under 1) while it is ahead. Measured there: 291 of 448 gates past the threshold
  at the end of the search (the fixed strength: 0).
- Widths: a channel is dropped when log alpha >= 3 (reported per group); the shared target
  step ranks channels by log alpha. The scores are -log alpha *before* the clip: channels
  that never left the -8 clip would otherwise tie and be ranked by index.
- Refit (`refit`, the default): the plan's channels restart from the baseline's weights
  (the gates' network is a noisy one: fine-tuned from its weights the growing strength's plan
  reached 73.4% validation top-1 on CIFAR ResNet-20, from the baseline's 84.5%). With
  `--set refit=false` the proposal carries the search's weights, where test time uses the
  means: the final theta is folded into the weights (the norm's gamma and
  beta, or the producer's output rows and bias, at every gate point), so the plain
  architecture with the returned state dict computes what the gated model computes with
  z = theta.
- `max_ratio` (1.0: no cap): the largest share of a group the plan may remove, as
  magnitude's: the target step keeps every group at its floor at least (`common.share_floor`;
  the gates train as without the cap, the landing ranks the kept channels by log alpha). On
  CIFAR ResNet-32 from the 90% baseline the cost-weighted KL thinned the second stage's
  residual stream to 8 of 32 channels and the plan scored 84.70% validation top-1, inside
  uniform widths' range (eighteenth session); with `max_ratio=0.7` 84.96% (test 85.62%
  against 85.40%; one seed, inside the fine-tuning spread, nineteenth session), so the
  default stays without a cap.
- `plan_widths` (off): the strength's path measures the channels the drop rule keeps, counted
  as the plan will keep them (a group's kept count rounded up to the plan's multiple,
  `common.alive_cost`, as group lasso's `floor` counts its zeros). Counted at the kept
  channels alone, the drops can meet the path while the rounded plan does not, and the
  landing takes the difference from channels the gates kept. On CIFAR ResNet-20 (one seed,
  twenty-fifth session) it moved two groups' widths and scored 84.72% validation top-1 against
  the default's 85.24%, inside the fine-tuning spread: off by default (`cifar10_table.md`).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from .base import Method, Proposal, SearchContext
from .common import (COST_PER, PENALTY_BOUNDS, alive_cost, cost_weights, fold_gates, shared_bounds,
                     path_ratio, share_floors, strength_path)

K1, K2, K3 = 0.63576, 1.87320, 1.48695
LOG_ALPHA_MIN, LOG_ALPHA_MAX = -8.0, 8.0
DROP_THRESHOLD = 3.0


# --------------------------------------------------------------------------- the mathematics


def clip_log_alpha(log_alpha: torch.Tensor, straight_through: bool = False) -> torch.Tensor:
    """clip(log alpha, -8, 8); with `straight_through` the gradient passes the clip."""
    clipped = log_alpha.clamp(LOG_ALPHA_MIN, LOG_ALPHA_MAX)
    if straight_through:
        return log_alpha + (clipped - log_alpha).detach()
    return clipped


def log_alpha_of(theta: torch.Tensor, log_sigma2: torch.Tensor, clip: bool = True,
                 straight_through: bool = False) -> torch.Tensor:
    """log alpha = log sigma^2 - log theta^2 (clipped unless `clip=False`)."""
    la = log_sigma2 - torch.log(theta * theta + 1e-16)
    return clip_log_alpha(la, straight_through) if clip else la


def neg_kl(log_alpha: torch.Tensor) -> torch.Tensor:
    """-KL = k1 sigmoid(k2 + k3 log alpha) - 0.5 log1p(exp(-log alpha)) - k1 (per channel)."""
    return K1 * torch.sigmoid(K2 + K3 * log_alpha) - 0.5 * F.softplus(-log_alpha) - K1


def kl(log_alpha: torch.Tensor) -> torch.Tensor:
    """The KL approximation per channel (>= 0, -> 0 as log alpha -> inf)."""
    return -neg_kl(log_alpha)


def kl_beta(step: int, total: int, start: float = 0.15, end: float = 0.6) -> float:
    """KL warm-up weight after `step` of `total` optimizer steps: 0 until `start * total`,
    linear to 1 at `end * total`, then 1."""
    if total <= 0:
        return 1.0
    t = step / total
    if t <= start:
        return 0.0
    if t >= end or end <= start:
        return 1.0
    return (t - start) / (end - start)


def dropped_mask(log_alpha: torch.Tensor | np.ndarray, threshold: float = DROP_THRESHOLD
                 ) -> np.ndarray:
    """True where a channel is dropped: clipped log alpha >= threshold."""
    la = torch.as_tensor(log_alpha).detach().clamp(LOG_ALPHA_MIN, LOG_ALPHA_MAX)
    return (la >= threshold).cpu().numpy()


# --------------------------------------------------------------------------- the gates


class VDGates(nn.Module):
    """theta and log sigma^2 per channel of every gated group; `step` counts optimizer steps
    (a buffer, so that the KL warm-up resumes with the training checkpoint)."""

    def __init__(self, sizes: dict[int, int], theta_init: float = 1.0,
                 log_sigma2_init: float = -10.0, straight_through: bool = True) -> None:
        super().__init__()
        self.sizes = dict(sizes)
        self.straight_through = straight_through
        self.theta = nn.ParameterDict(
            {str(g): nn.Parameter(torch.full((n,), float(theta_init))) for g, n in sizes.items()})
        self.log_sigma2 = nn.ParameterDict(
            {str(g): nn.Parameter(torch.full((n,), float(log_sigma2_init)))
             for g, n in sizes.items()})
        self.register_buffer("step", torch.zeros((), dtype=torch.long))
        # the KL's strength multiplier (`schedule` "growing"; 1: the paper's), a buffer so
        # that it resumes with the training checkpoint
        self.register_buffer("strength", torch.ones((), dtype=torch.float64))
        self.weights: dict[int, float] = {}  # KL weight per group (`cost_weight`); absent: 1

    batch: int = 0  # samples in the current forward pass (set by `PerSample`); 0: one draw

    def sample(self, gid: int) -> torch.Tensor:
        theta = self.theta[str(gid)]
        if not self.training:
            return theta  # test time: the means
        sigma = torch.exp(0.5 * self.log_sigma2[str(gid)])
        if self.batch > 0:  # per-sample noise: (batch, size)
            eps = torch.randn(self.batch, theta.numel(), dtype=theta.dtype,
                              device=theta.device)
            return theta + sigma * eps
        return theta + sigma * torch.randn_like(theta)

    def gates(self) -> dict:
        return {g: (lambda g=g: self.sample(g)) for g in self.sizes}

    def log_alpha(self, gid: int, clip: bool = True) -> torch.Tensor:
        return log_alpha_of(self.theta[str(gid)], self.log_sigma2[str(gid)], clip,
                            self.straight_through)

    def kl_sum(self) -> torch.Tensor:
        return sum(self.weights.get(g, 1.0) * kl(self.log_alpha(g)).sum() for g in self.sizes)


class PerSample(nn.Module):
    """Runs the gated model after telling the gates the batch size (per-sample draws)."""

    def __init__(self, net: nn.Module, gates: VDGates) -> None:
        super().__init__()
        self.net = net
        self._set_batch = lambda b: setattr(gates, "batch", int(b))

    def forward(self, *args):
        x = args[0]
        self._set_batch(x.shape[0] if isinstance(x, torch.Tensor) and x.dim() > 0 else 0)
        return self.net(*args)


class VariationalDropout(Method):
    name = "vardrop"
    summary = ("structured variational dropout: a Gaussian gate per coupled channel, KL-"
               "regularised; channels ranked by log alpha (dropped at log alpha >= 3)")
    cost = ("one training run of the search budget with gates (on CIFAR ResNet-20: 93 s for "
            "2 epochs, about plain training)")
    choices = {"cost_per": COST_PER, "schedule": ("growing", "fixed")}
    defaults = {
        "lr": 1e-3,  # Adam, network weights (the paper's optimiser)
        "gate_lr": None,  # Adam, theta and log sigma^2; None: scaled to the budget (docstring)
        "theta_init": 1.0,
        "log_sigma2_init": -10.0,
        "warmup_start": 0.15,  # beta = 0 until this fraction of the search steps
        "warmup_end": 0.6,  # beta = 1 from this fraction on
        "drop_threshold": DROP_THRESHOLD,
        "straight_through": True,
        "per_sample": True,  # noise drawn per sample (local reparameterisation)
        "cost_weight": 1.0,  # KL of a channel x its cost in the target's metric ^ this
        "cost_per": "slice",  # that cost per tied weight tensor, or per channel (docstring)
        "schedule": "growing",  # the KL's strength: "growing" to the target, or "fixed" (1)
        "max_growth": 1e4,  # the strength may grow this much over the reach window
        "growth": None,  # factor per step; None: max_growth spread over the reach window
        "reach": None,  # the drops' cost meets the target by this fraction; None: warmup_end
        "refit": True,  # the fine-tuning starts from the baseline's weights on the plan
        "max_ratio": 1.0,  # the largest share of a group the plan may remove (docstring)
        "plan_widths": False,  # the path counts kept channels at the plan's widths (docstring)
    }
    bounds = {**shared_bounds(defaults, PENALTY_BOUNDS), "gate_lr": "(0, inf)",
              "warmup_start": "[0, 1]", "warmup_end": "[0, 1]"}

    def search(self, ctx: SearchContext) -> Proposal:
        s = self.settings_of(ctx)
        max_ratio = float(s["max_ratio"])
        # the cost the strength's path measures: the channels the drop rule keeps, or with
        # `plan_widths` those rounded up to the plan's multiple as the landing will keep them
        rt = int(ctx.round_to) if s["plan_widths"] else 1
        groups = ctx.graph.prunable_groups
        baseline = {k: v.detach().clone() for k, v in ctx.model.state_dict().items()}
        gates = VDGates({g.id: g.size for g in groups}, s["theta_init"], s["log_sigma2_init"],
                        bool(s["straight_through"]))
        device = next(ctx.model.parameters()).device
        gates.to(device)
        gates.weights = cost_weights(ctx, float(s["cost_weight"]), s["cost_per"], self.name)
        net = ctx.gated(gates.gates(), gates)
        if s["per_sample"]:
            net = PerSample(net, gates)
        n_train = len(ctx.data.train)
        total = ctx.budget_steps(ctx.epochs)
        schedule = str(s["schedule"]).lower()
        start = float(s["warmup_start"])
        reach = float(s["reach"]) if s["reach"] is not None else float(s["warmup_end"])
        ev, ratio, r0, _, growth = strength_path(
            ctx, {"reach": reach - start, "growth": s["growth"],
                  "max_growth": s["max_growth"]}, total)
        trace: list = []

        def extra_loss(_model):
            beta = kl_beta(int(gates.step), total, start, s["warmup_end"])
            return beta * float(gates.strength) * gates.kl_sum() / n_train

        @torch.no_grad()
        def on_step(_model, _step):
            gates.step += 1
            if schedule != "growing":
                return
            # The strength follows a straight path of the cost of the channels not dropped,
            # from the baseline's (at the warm-up's start) to the target's (at `reach`):
            # it grows while the drops lag the path and eases off while they are ahead, never
            # under the paper's 1.
            f = int(gates.step) / max(total, 1)
            if f <= start:
                return
            alive = {g: ~dropped_mask(gates.log_alpha(g), s["drop_threshold"])
                     for g in gates.sizes}
            r = ratio(alive_cost(ctx.graph, alive, ev, rt))
            wanted = max(1.0, path_ratio(r0, 1.0, f, reach, start))
            gates.strength.mul_(growth if r > wanted else 1.0 / growth).clamp_(min=1.0)
            if int(gates.step) % max(1, total // 20) == 0:
                trace.append({"step": int(gates.step), "strength": float(gates.strength),
                              "kept_cost_ratio": r, "wanted": wanted})

        gate_lr = float(s["gate_lr"]) if s["gate_lr"] is not None else \
            max(1e-2, 12.0 / max(1.0, total * (1 - float(s["warmup_start"]))))
        gate_ids = {id(p) for p in gates.parameters()}
        weights = [p for p in net.parameters() if p.requires_grad and id(p) not in gate_ids]

        def optimizer(_model):
            return torch.optim.Adam([
                {"params": weights, "lr": float(s["lr"]), "weight_decay": 0.0},
                {"params": list(gates.parameters()), "lr": gate_lr,
                 "weight_decay": 0.0}])

        ctx.log(f"vardrop: {total} steps, gate lr {gate_lr:.3g}, KL weight 0 until step "
                f"{int(start * total)}, 1 from step {int(s['warmup_end'] * total)}; loss = CE + "
                f"beta KL / {n_train}" + (f" x a strength growing x{growth:.4g} per step while "
                                          "the drops lag the path to the target"
                                          if schedule == "growing" else ""))
        result = ctx.train(net, ctx.epochs, "vardrop", extra_loss=extra_loss, on_step=on_step,
                           optimizer=optimizer)

        with torch.no_grad():
            la = {g.id: gates.log_alpha(g.id).detach().cpu() for g in groups}
            raw = {g.id: gates.log_alpha(g.id, clip=False).detach().cpu().double()
                   for g in groups}
            theta = {g.id: gates.theta[str(g.id)].detach().clone() for g in groups}
            final_kl = float(gates.kl_sum())
        unfolded = fold_gates(ctx, theta)
        if unfolded:
            ctx.log(f"vardrop: no parameter to fold the gate means into at {unfolded}; the "
                    "slim model starts from the weights without them")
        scores = {gid: (-v).numpy() for gid, v in raw.items()}
        plan = ctx.land(scores, share_floors(ctx.graph, max_ratio, ctx.round_to))

        drops = {gid: int(dropped_mask(v, s["drop_threshold"]).sum()) for gid, v in la.items()}
        rule_keep = {gid: np.flatnonzero(~dropped_mask(v, s["drop_threshold"])).tolist()
                     for gid, v in la.items() if drops[gid]}
        everything = torch.cat(list(la.values())).numpy() if la else np.zeros(0)
        edges = np.arange(LOG_ALPHA_MIN, LOG_ALPHA_MAX + 1e-9, 2.0)
        counts, _ = np.histogram(everything, bins=edges)
        info = {
            "dropped_per_group": {str(g): n for g, n in drops.items()},
            "dropped_total": int(sum(drops.values())),
            "channels_total": int(sum(g.size for g in groups)),
            "log_alpha_histogram": {"edges": edges.tolist(), "counts": counts.tolist()},
            "log_alpha_summary": _summary(everything),
            "final_kl": final_kl,
            "steps": total, "gate_lr": gate_lr, "cost_weight": float(s["cost_weight"]),
            "cost_per": str(s["cost_per"]).lower(),
            "cost_pay": {str(g): float(v) for g, v in gates.weights.items()},
            "schedule": schedule, "strength_final": float(gates.strength), "growth": growth,
            "target_flops": next((c.limit for c in ctx.constraints if c.metric == "flops"),
                                 None),
            "strength_trace": trace, "path_round_to": rt,
            "train_history": result.history,
            "unfolded_gate_points": unfolded,
        }
        try:
            info["drop_rule_cost"] = ctx.graph.cost(rule_keep).as_dict()
        except Exception as exc:  # noqa: BLE001 - a rule plan may remove a needed branch
            info["drop_rule_cost"] = f"not a valid plan ({exc})"
        ctx.log(f"vardrop: {info['dropped_total']} of {info['channels_total']} channels at "
                f"log alpha >= {s['drop_threshold']:g}; log alpha "
                + ", ".join(f"{k} {v:.2f}" for k, v in info["log_alpha_summary"].items()))
        info["refit"] = bool(s["refit"])
        if s["refit"]:
            # The gates chose the plan; the weights they trained are the noisy network's
            # (a strong KL drives most gates to log alpha >= 3, and the survivors co-adapt to
            # that noise): the fine-tuning starts from the baseline's weights on the plan, as
            # group lasso's and MorphNet's refits do. Measured on CIFAR ResNet-20 at 1/3
            # FLOPs with the growing strength: from the trained weights 73.4% validation
            # top-1 after the full fine-tune (cifar10_table.md).
            ctx.model.load_state_dict(baseline)
            ctx.log("vardrop: the plan's channels restart from the baseline's weights (refit)")
        state = {k: v.detach().clone() for k, v in ctx.model.state_dict().items()}
        return Proposal(plan, state, info)


def _summary(values: np.ndarray) -> dict:
    if values.size == 0:
        return {}
    q = np.quantile(values, [0.0, 0.25, 0.5, 0.75, 1.0])
    return {"min": float(q[0]), "q25": float(q[1]), "median": float(q[2]),
            "q75": float(q[3]), "max": float(q[4]), "mean": float(values.mean())}


__all__ = ["VariationalDropout", "VDGates", "kl", "neg_kl", "kl_beta", "clip_log_alpha",
           "log_alpha_of", "dropped_mask", "fold_gates", "K1", "K2", "K3"]
