"""`esnac`: Bayesian optimisation over compressed architectures of the teacher (Cao et al.,
ICLR 2019; METHODS.md section 7; reference code Friedrich1006/ESNAC, read, not copied).

- Actions on the teacher: every prunable group shrinks to `w = max(1, floor((1 - r) C_g))`,
  r ~ U[0, 1]; a removable group (a residual or concat branch) is removed with a probability
  p drawn per action from {0.3, 0.4, 0.5, 0.6, 0.7}. A group keeps its strongest channels
  (baseline L2 norm). Actions the graph cannot realise or above the target are rejected (and
  redrawn), so every candidate is feasible. Adding skip connections (optional in METHODS.md)
  is not done.
- Layer features, one vector per conv/linear/matmul of the cost model in its order: one-hot
  type (conv, depthwise, linear/matmul), log of the MAC coefficient (kernel x output
  positions / groups), kept in and out widths (fraction and log), alive flag, and where its
  input comes from (distance back to the producing layer, number of producing layers).
- Embedding: a bidirectional LSTM (4 layers, hidden 64) over the layers, mean-pooled and
  L2-normalised. Kernel `k(a, b) = exp(-||e_a - e_b||^2 / (2 * 0.01))`, noise 0.05 on the
  diagonal, prior mean the mean of the observed rewards. The embedding is trained by
  maximising the leave-one-out predictive log-likelihood (closed form from the inverse
  Gram matrix; Adam lr 1e-3, weight decay 5e-4, up to 100 steps, stopping when an EMA (0.5)
  of the likelihood changes by less than 1e-3).
- Multiple kernels: each step fits `kernels` (8) embeddings, each on a random half of the
  history (from the same initial weights), and each picks the expected-improvement argmax
  (posterior on the whole history) over `actions` (1000) random feasible actions; 8
  candidates a step (distinct), `steps` (20) steps after `init` (8) random ones.
- Reward: `C = 1 - cost_s / cost_t` on the binding constrained metric (the first target),
  `A = acc_s / acc_t` on the validation split, `R = C (2 - C) A`. Candidates: the teacher's
  weights sliced to the action, trained briefly with logit-MSE distillation from the teacher
  (Adam, lr `candidate_lr`), scored on validation (the candidate evaluator).
- Candidates at the target (`at_target`, on by default; off: the paper's): every action is
  scaled by one multiplier to the target (`ctx.land_widths`, the final landing's step) before
  it is scored, and the GP learns the reward of an action's *shape* at the target's cost.
  The paper's reward trades cost against accuracy; under a hard target the feasible random
  actions lie anywhere below it (most far below: every group's width is drawn uniformly),
  the reward favoured the smallest (C grows as the cost falls), and the landing then scaled
  the winner up by a multiplier its score never saw. Measured on CIFAR ResNet-20 at 1/3
  FLOPs, same search budget and fine-tune (`cifar10_table.md`): the paper's candidates gave
  a plan of 85k parameters at 83.98% validation top-1 (0.9 under uniform widths); scored at
  the target, a plan of 185k parameters (five blocks removed, the last stage kept wide) at
  85.82%.
- Landing: the best-reward action's widths through the shared target step
  (`ctx.land_widths`, one bisected multiplier, channels ranked by norm); the pipeline then
  fine-tunes it fully (the original fine-tunes the best few; here the best one).
- Resume: the history is saved to `ctx.state_dir / "esnac.json"` after every step and every
  evaluation is cached (`evals-esnac/`); all randomness is seeded by (seed, step), so a rerun
  continues where it stopped.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..checkpoint import write_json
from ..evaluator import EvalSettings
from ..graph import PlanError
from ..load import UserError
from ..target import CostMeter
from .base import Method, Proposal, SearchContext
from .common import (CANDIDATE_BOUNDS, CANDIDATE_SCORING, candidate_scoring, channel_order,
                     importance_of, keep_of_widths, make_evaluator, steps_for)
from ..units import human

LENGTH2 = 0.01  # the kernel's squared length scale: exp(-d^2 / (2 * 0.01))
NOISE = 0.05
REMOVE_P = (0.3, 0.4, 0.5, 0.6, 0.7)


# --------------------------------------------------------------------------- the GP


def kernel(a: torch.Tensor, b: torch.Tensor, length2: float = LENGTH2) -> torch.Tensor:
    d2 = (a[:, None, :] - b[None, :, :]).pow(2).sum(-1)
    return torch.exp(-d2 / (2 * length2))


def gp_posterior(E: torch.Tensor, y: torch.Tensor, Q: torch.Tensor, noise: float = NOISE,
                 length2: float = LENGTH2):
    """Posterior mean and standard deviation (latent, without the noise) at embeddings `Q`
    given observations `y` at embeddings `E`; prior mean mean(y), prior variance 1."""
    m = y.mean()
    K = kernel(E, E, length2) + noise * torch.eye(len(E), dtype=E.dtype)
    Ks = kernel(Q, E, length2)
    alpha = torch.linalg.solve(K, (y - m)[:, None])[:, 0]
    mean = m + Ks @ alpha
    v = torch.linalg.solve(K, Ks.T)
    var = (1.0 - (Ks * v.T).sum(1)).clamp_min(1e-12)
    return mean, var.sqrt()


def loo_log_likelihood(E: torch.Tensor, y: torch.Tensor, noise: float = NOISE,
                       length2: float = LENGTH2) -> torch.Tensor:
    """Sum over i of log p(y_i | y_-i) for the GP (closed form from the inverse Gram matrix:
    mean_i = y_i - [K^-1 y]_i / [K^-1]_ii, variance 1 / [K^-1]_ii)."""
    m = y.mean()
    K = kernel(E, E, length2) + noise * torch.eye(len(E), dtype=E.dtype)
    A = torch.linalg.inv(K)
    alpha = A @ (y - m)
    d = torch.diagonal(A)
    var = 1.0 / d
    resid = alpha / d
    return (-0.5 * torch.log(2 * math.pi * var) - resid.pow(2) / (2 * var)).sum()


def expected_improvement(mean: torch.Tensor, sd: torch.Tensor, best: float) -> torch.Tensor:
    z = (mean - best) / sd
    normal = torch.distributions.Normal(0.0, 1.0)
    return (mean - best) * normal.cdf(z) + sd * normal.log_prob(z).exp()


class Embedding(nn.Module):
    """Bidirectional LSTM over the layer features, mean-pooled, L2-normalised."""

    def __init__(self, features: int, hidden: int = 64, layers: int = 4):
        super().__init__()
        self.lstm = nn.LSTM(features, hidden, num_layers=layers, bidirectional=True,
                            batch_first=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, _ = self.lstm(x)
        return nn.functional.normalize(h.mean(1), dim=1)


def fit_embedding(net: Embedding, X: torch.Tensor, y: torch.Tensor, steps: int = 100,
                  lr: float = 1e-3, weight_decay: float = 5e-4, tol: float = 1e-3) -> int:
    """Maximise the LOO log-likelihood of (X, y); returns the steps taken."""
    if len(y) < 2:
        return 0
    opt = torch.optim.Adam(net.parameters(), lr=lr, weight_decay=weight_decay)
    ema = None
    for step in range(1, steps + 1):
        opt.zero_grad()
        ll = loo_log_likelihood(net(X), y)
        (-ll).backward()
        opt.step()
        v = float(ll.detach())
        new = v if ema is None else 0.5 * ema + 0.5 * v
        if ema is not None and abs(new - ema) < tol:
            return step
        ema = new
    return steps


# --------------------------------------------------------------------------- actions, features


def reward(cost_s: float, cost_t: float, acc_s: float, acc_t: float) -> float:
    """ESNAC's reward R = C (2 - C) A, C = 1 - cost_s / cost_t, A = acc_s / acc_t."""
    C = 1.0 - cost_s / cost_t
    A = acc_s / max(acc_t, 1e-12)
    return C * (2.0 - C) * A


def sample_action(rng: np.random.Generator, groups) -> dict[int, int]:
    p = REMOVE_P[int(rng.integers(len(REMOVE_P)))]
    w = {}
    for g in groups:
        r = rng.random()
        gone = rng.random() < p
        w[g.id] = 0 if (g.removable and gone) else max(1, int(math.floor((1 - r) * g.size)))
    return w


class Features:
    """Per-layer feature sequences of actions (static parts computed once)."""

    def __init__(self, graph):
        self.graph = graph
        self.terms = graph.mac_terms()
        n = len(self.terms)
        node_term = {}
        for i, t in enumerate(self.terms):
            for node in t.nodes:
                node_term.setdefault(node, i)
        self.static = np.zeros((n, 6))
        for i, t in enumerate(self.terms):
            depthwise = len(t.layouts) == 1
            conv = not depthwise and any(getattr(graph.rule(node), "family", "") == "conv"
                                         for node in t.nodes)
            self.static[i, 0 if conv else 1 if depthwise else 2] = 1.0
            self.static[i, 3] = math.log1p(t.coeff) / 10.0
            # where the input comes from: the nearest producing layers upstream
            producers = set()
            for node in t.nodes[:1]:
                stack, seen = list(graph.nx.predecessors(node)), set()
                while stack:
                    u = stack.pop()
                    if u in seen:
                        continue
                    seen.add(u)
                    if u in node_term and node_term[u] != i:
                        producers.add(node_term[u])
                    else:
                        stack.extend(graph.nx.predecessors(u))
            self.static[i, 4] = (i - max(producers)) / n if producers else 0.0
            self.static[i, 5] = len(producers) / 4.0
        self.full = [[float(lay.const + lay.mult.sum()) for lay in t.layouts] for t in self.terms]
        sizes = [g.size for g in graph.groups]
        self.offset = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        self.pos = [[self.offset[np.asarray(lay.groups, dtype=np.int64)]
                     + np.asarray(lay.index, dtype=np.int64) for lay in t.layouts]
                    for t in self.terms]

    @property
    def size(self) -> int:
        return self.static.shape[1] + 5

    def __call__(self, keep: dict) -> np.ndarray:
        kept = np.ones(int(self.offset[-1]))
        for gid, idx in keep.items():
            off, size = self.offset[gid], self.graph.groups[gid].size
            kept[off:off + size] = 0.0
            kept[off + np.asarray(idx, dtype=np.int64)] = 1.0
        try:
            dead = self.graph.removal(keep).dead
        except PlanError:
            dead = frozenset()
        out = np.zeros((len(self.terms), 5))
        for i, t in enumerate(self.terms):
            counts = [float(lay.const + np.dot(lay.mult, kept[pos]))
                      for lay, pos in zip(t.layouts, self.pos[i])]
            inc, outc = (counts + counts)[:2] if len(counts) == 1 else counts[:2]
            fin, fout = (self.full[i] + self.full[i])[:2]
            alive = 0.0 if t.nodes and all(n in dead for n in t.nodes) else 1.0
            out[i] = [inc / max(fin, 1e-9), outc / max(fout, 1e-9), math.log1p(inc) / 8,
                      math.log1p(outc) / 8, alive]
        return np.concatenate([self.static, out], 1)


# --------------------------------------------------------------------------- the method


class ESNAC(Method):
    name = "esnac"
    summary = ("Bayesian optimisation of compressed teachers: BiLSTM layer embedding, GP "
               "kernels fitted by LOO likelihood on random halves, expected improvement, "
               "reward C(2-C)A, distilled candidates")
    cost = ("init + steps x kernels short distillation fine-tunes (default 8 + 20 x 8 = 168, "
            "the search budget split among them) plus GP fits; evaluations run in parallel "
            "(--workers, --ray)")
    defaults = {
        "init": 8,  # random feasible actions before the first GP
        "steps": 20,
        "kernels": 8,  # kernels (and candidates) per step
        "actions": 1000,  # random feasible actions the acquisition chooses from
        "fit_steps": 100,
        "candidate_steps": None,  # distillation steps per candidate (None: from the budget)
        "candidate_lr": 1e-3,
        "at_target": True,  # each candidate scaled to the target before it is scored
        **CANDIDATE_SCORING,  # the candidate score (methods/common.py)
    }
    bounds = {"init": "[1, inf)", "steps": "[0, inf)", "kernels": "[1, inf)",
              "actions": "[1, inf)", "fit_steps": "[0, inf)", "candidate_lr": "(0, inf)",
              "candidate_steps": "[0, inf)", **CANDIDATE_BOUNDS}

    def search(self, ctx: SearchContext) -> Proposal:
        s = self.settings_of(ctx)
        n_init, n_steps, n_kernels = int(s["init"]), int(s["steps"]), int(s["kernels"])
        n_actions, fit_steps = int(s["actions"]), int(s["fit_steps"])
        graph = ctx.graph
        groups = graph.prunable_groups
        order = channel_order(ctx)
        meter = CostMeter(graph, ctx.constraints, ctx.latency_model)
        metric = ctx.constraints[0].metric
        teacher_cost = {"flops": float(graph.baseline.flops),
                        "params": float(graph.baseline.params)}.get(metric)
        if teacher_cost is None:  # latency: the fitted model's value at the baseline
            teacher_cost = meter.measure({})[metric]
        feats = Features(graph)

        def keep_of(w):
            return keep_of_widths(graph, order, w)

        at_target = bool(s["at_target"])
        importance = importance_of(order)

        def scored_plan(w):
            """The plan a candidate is scored as: the action itself, or (`at_target`) the
            action's widths scaled by one multiplier to the target, as the final landing
            does, so that candidates compete on their shape at the cost the result will
            have instead of on how far under the target they are."""
            if not at_target:
                return keep_of(w)
            try:
                return ctx.land_widths(w, importance, revive=True).keep
            except UserError:
                return None

        def feasible(w) -> bool:
            try:
                return meter.feasible(meter.measure(keep_of(w)))
            except PlanError:
                return False

        def pool(step: int, n: int) -> list[dict[int, int]]:
            rng = np.random.default_rng([int(ctx.seed), 7, int(step)])
            out, seen, tries = [], set(), 0
            while len(out) < n and tries < 50 * n:
                tries += 1
                w = sample_action(rng, groups)
                key = tuple(sorted(w.items()))
                if key in seen or not feasible(w):
                    continue
                seen.add(key)
                out.append(w)
            if not out:
                raise UserError("esnac: no random action meets the target; raise the target")
            return out

        settings = EvalSettings(
            steps=int(s["candidate_steps"]) if s["candidate_steps"] is not None
            else steps_for(ctx, n_init + n_steps * n_kernels),
            lr=float(s["candidate_lr"]), batch_size=ctx.batch_size, optimizer="adam",
            weight_decay=0.0, distill=True, seed=ctx.seed, **candidate_scoring(s))
        teacher = {k: v.detach().clone() for k, v in ctx.model.state_dict().items()}
        acc_t = ctx.evaluate(ctx.model)
        path = Path(ctx.state_dir) / "esnac.json"
        fingerprint = {"init": n_init, "steps": n_steps, "kernels": n_kernels,
                       "actions": n_actions, "fit_steps": fit_steps, "seed": int(ctx.seed),
                       "candidate_steps": settings.steps, "lr": settings.lr,
                       "at_target": at_target,
                       "constraints": [[c.metric, c.limit] for c in ctx.constraints]}
        history: list[dict] = []
        done_steps = 0
        if path.exists():
            saved = json.loads(path.read_text())
            if saved.get("fingerprint") != fingerprint:
                raise UserError(f"'{path}' was written with other settings; delete it to "
                                "restart the search")
            history, done_steps = saved["history"], int(saved["steps_done"])
            ctx.log(f"esnac: resuming after step {done_steps}")
        ctx.log(f"esnac: teacher top-1 {100 * acc_t:.2f}% (validation); {n_init} random + "
                f"{n_steps} x {n_kernels} candidates, {settings.steps} distillation steps each")

        with make_evaluator(ctx, settings, self.name) as ev:
            def run(actions, step):
                keeps = [scored_plan(w) for w in actions]
                actions = [w for w, k in zip(actions, keeps) if k is not None]
                keeps = [k for k in keeps if k is not None]
                res = ev.evaluate(keeps, teacher, teacher_state=teacher,
                                  labels=[f"s{step}.{j}" for j in range(len(actions))])
                for w, r in zip(actions, res):
                    if not math.isfinite(r.accuracy):
                        continue
                    cost_s = r.flops if metric == "flops" else r.params if metric == "params" \
                        else meter.measure(r.keep)[metric]
                    R = reward(cost_s, teacher_cost, r.accuracy, acc_t)
                    history.append({"step": step, "widths": {str(g): v for g, v in w.items()},
                                    "accuracy": r.accuracy, "flops": r.flops,
                                    "params": r.params, "reward": R})
                    if not r.cached:
                        ctx.candidates.append({"flops": r.flops, "params": r.params,
                                               "accuracy": r.accuracy,
                                               "label": f"esnac {r.label}"})

            def save(step):
                write_json(path, {"fingerprint": fingerprint, "steps_done": step,
                                  "history": history}, every_rank=True)

            if done_steps == 0:
                run(pool(0, n_init), 0)
                done_steps = 1
                save(done_steps)
            while done_steps <= n_steps:
                step = done_steps
                picks = self.acquire(ctx, feats, history, pool(step, n_actions), step,
                                     n_kernels, fit_steps, keep_of)
                run(picks, step)
                done_steps += 1
                save(done_steps)
                best = max(history, key=lambda h: h["reward"]) if history else None
                if best is not None:
                    ctx.log(f"esnac: step {step}/{n_steps}: best reward {best['reward']:.4f} "
                            f"(top-1 {100 * best['accuracy']:.1f}%, "
                            f"{human(best['flops'], 'FLOPs')})")
            fresh, cached = ev.fresh, ev.cached
        if not history:
            raise UserError("esnac: no candidate could be evaluated")
        best = max(history, key=lambda h: h["reward"])
        widths = {int(g): int(v) for g, v in best["widths"].items()}
        plan = ctx.land_widths(widths, importance, revive=True)
        ctx.log(f"esnac: best reward {best['reward']:.4f} at step {best['step']} "
                f"({fresh} evaluations run now, {cached} from the cache); landed at "
                f"{human(plan.achieved['flops'], 'FLOPs')}")
        info = {"history": history, "teacher_accuracy": acc_t, "best": best,
                "at_target": at_target,
                "candidate_steps": settings.steps, "evaluations_run": fresh,
                "evaluations_cached": cached}
        return Proposal(plan, teacher, info)

    def acquire(self, ctx, feats, history, actions, step, n_kernels, fit_steps, keep_of):
        """The step's candidates: each kernel's EI argmax over `actions`, distinct."""
        X_hist = torch.tensor(np.stack([feats(keep_of({int(g): v for g, v in
                                                       h["widths"].items()}))
                                        for h in history]), dtype=torch.float32)
        y = torch.tensor([h["reward"] for h in history], dtype=torch.float32)
        X_pool = torch.tensor(np.stack([feats(keep_of(w)) for w in actions]),
                              dtype=torch.float32)
        torch.manual_seed(int(ctx.seed))
        init = Embedding(feats.size).state_dict()
        best = float(y.max())
        chosen: list[int] = []
        for j in range(n_kernels):
            rng = np.random.default_rng([int(ctx.seed), 11, int(step), j])
            half = rng.permutation(len(y))[:max(2, len(y) // 2)]
            net = Embedding(feats.size)
            net.load_state_dict(init)
            torch.manual_seed(int(ctx.seed) * 1000 + step * 10 + j)
            fit_embedding(net, X_hist[half], y[half], steps=fit_steps)
            with torch.no_grad():
                mean, sd = gp_posterior(net(X_hist), y, net(X_pool))
                ei = expected_improvement(mean, sd, best)
            chosen.append(self.pick(ei, chosen))
        return [actions[i] for i in chosen]

    @staticmethod
    def pick(ei: torch.Tensor, taken: list[int]) -> int:
        """The EI argmax among the actions not taken yet (first among equals)."""
        ei = ei.clone()
        if taken:
            ei[torch.as_tensor(taken)] = -math.inf
        return int(torch.argmax(ei))


__all__ = ["ESNAC", "gp_posterior", "loo_log_likelihood", "expected_improvement", "kernel",
           "reward", "Embedding", "Features", "sample_action"]
