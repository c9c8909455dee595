"""`autoshrink`: topology-aware edge shrinking (Zhang et al. 2019; METHODS.md section 5).

- Edges of the traced graph: the removable inputs of merges, i.e. the removable groups (a
  residual branch, never the identity path, which is no removable group; a concat input such
  as an Inception branch or a dense connection), while they are still on. While fewer branch
  edges than draws per step (`k`) are left, channel blocks are edges too: removing one
  drops the weakest `block` fraction (an eighth) of a group's original width, never below one
  channel, so the search always has moves.
- Each step shuffles the current edges (seeded by the run's seed and the step), draws
  k = min(10, |E|), and scores each removal by a short fine-tune from inherited weights
  (the baseline's, sliced to the candidate: the candidate evaluator),
  `score = acc - 0.1 (log10 MACs - 6)`, acc the validation top-1 in [0, 1]. The best removal
  is applied (ties: the first drawn), groups left empty by it (dead nodes) are dropped, and
  the step is snapshotted. A removal the graph cannot realise (two concat branches that may
  not both go) or that leaves the output without an input is never drawn.
- It stops once every target holds and lands within 1% below the target with the shared
  step over the remaining groups (`ctx.land_widths`: one bisected multiplier, removed
  branches stay removed).
- Budget: the candidate fine-tune is `ctx.epochs` split over the expected number of
  candidates (steps x k, the steps estimated by a cost-only dry run), at least one step.
- `--set inherit=current` (the issue's progressive shrinking; the paper restarts every
  candidate from the baseline's weights, `inherit=baseline`, the default): the candidates of
  a step start from the weights the chosen candidate of the step before was trained to, so
  the network trains on while it shrinks and the search hands those weights to the
  fine-tuning.
- Resume: snapshots go to `ctx.state_dir / "autoshrink.json"` after every step, evaluations
  to `evals-autoshrink/`; a rerun continues after the last snapshot, a step interrupted mid-
  batch reruns only the evaluations that had not finished.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch

from ..checkpoint import save_atomic, write_json
from ..evaluator import EvalSettings
from ..evaluator.candidate import OPTIMIZERS
from ..graph import PlanError
from ..load import UserError
from ..passes.slim import slim, unslim_state
from ..target import LANDED, CostMeter
from .base import Method, Proposal, SearchContext
from .common import (CANDIDATE_BOUNDS, CANDIDATE_SCORING, candidate_scoring, channel_order,
                     importance_of, keep_of_widths, make_evaluator, steps_for)
from ..units import human


def shrink_score(accuracy: float, macs: float, weight: float = 0.1) -> float:
    """AutoShrink's candidate score: acc - 0.1 (log10 MACs - 6) (-inf for a plan that could
    not be sliced, NaN accuracy)."""
    if not math.isfinite(float(accuracy)):
        return -math.inf
    return float(accuracy) - weight * (math.log10(max(float(macs), 1.0)) - 6.0)


def edges(graph, widths: dict[int, int], block: dict[int, int], with_blocks: bool
          ) -> list[tuple[str, int]]:
    """The current edges: ("branch", g) for every removable group still on, and, with
    `with_blocks`, ("block", g) for every group that can still lose a block."""
    out = [("branch", g.id) for g in graph.prunable_groups if g.removable and widths[g.id] > 0]
    if with_blocks:
        out += [("block", g.id) for g in graph.prunable_groups if widths[g.id] > 1]
    return out


def apply_edge(graph, widths: dict[int, int], edge, block: dict[int, int]) -> dict[int, int]:
    kind, gid = edge
    out = dict(widths)
    out[gid] = 0 if kind == "branch" else max(1, widths[gid] - block[gid])
    return out


def draw(graph, order, widths: dict[int, int], block: dict[int, int], blocks: str,
         k: int, seed: int, step: int) -> list[tuple[str, int]]:
    """The step's candidate removals: the legal edges, shuffled by (seed, step), the first k.
    Channel blocks are edges with `blocks` "yes", or "auto" while fewer than k branch edges
    are left (so the search always has moves)."""
    def ok(e):
        return legal(graph, keep_of_widths(graph, order, apply_edge(graph, widths, e, block)))

    es = [e for e in edges(graph, widths, block, False) if ok(e)]
    if blocks == "yes" or (blocks == "auto" and len(es) < k):
        es += [e for e in edges(graph, widths, block, True) if e[0] == "block" and ok(e)]
    rng = np.random.default_rng([int(seed), int(step)])
    return [es[i] for i in rng.permutation(len(es))[:min(k, len(es))]]


def legal(graph, keep) -> bool:
    """The plan can be realised and the model still computes an output."""
    try:
        removal = graph.removal(keep)
        c = graph.cost(keep)
    except PlanError:
        return False
    return c.macs > 0 and not any(n == "output" for n in removal.dead)


class AutoShrink(Method):
    name = "autoshrink"
    summary = ("topology-aware edge shrinking: removes the residual/concat branch or channel "
               "block whose short fine-tune scores best (acc - 0.1 (log10 MACs - 6))")
    cost = ("k = 10 candidate fine-tunes per step, steps until the target (the search budget "
            "split among them); evaluations run in parallel (--workers, --ray)")
    defaults = {
        "k": 10,  # candidate removals drawn per step
        "block": 0.125,  # a channel block: this fraction of a group's original width
        "blocks": "auto",  # channel blocks as edges: "auto" (when few branches), "yes", "no"
        "mac_weight": 0.1,
        "candidate_steps": None,  # fine-tune steps per candidate (None: from the budget)
        "max_steps": 200,  # shrink steps at most
        "optimizer": "sgd",
        "inherit": "baseline",  # candidates start from: "baseline" or "current" (docstring)
        **CANDIDATE_SCORING,  # the candidate score (methods/common.py)
    }
    choices = {"blocks": ("auto", "yes", "no"), "optimizer": OPTIMIZERS,
               "inherit": ("baseline", "current")}
    bounds = {"k": "[1, inf)", "block": "(0, 1]", "max_steps": "[1, inf)",
              "mac_weight": "[0, inf)", "candidate_steps": "[0, inf)", **CANDIDATE_BOUNDS}

    def search(self, ctx: SearchContext) -> Proposal:
        s = self.settings_of(ctx)
        k, inherit = int(s["k"]), str(s["inherit"]).lower()
        graph = ctx.graph
        groups = graph.prunable_groups
        order = channel_order(ctx)
        block = {g.id: max(1, math.ceil(float(s["block"]) * g.size)) for g in groups}
        n_branches = sum(g.removable for g in groups)
        meter = CostMeter(graph, ctx.constraints, ctx.latency_model)

        def keep_of(w):
            return keep_of_widths(graph, order, w)

        def candidates(w, step):
            return draw(graph, order, w, block, str(s["blocks"]), k, ctx.seed, step)

        def settle(w):
            """Drop groups the removal left empty (dead nodes)."""
            zero = graph.removal(keep_of(w)).zero_groups
            return {gid: (0 if gid in zero else v) for gid, v in w.items()}

        def done(w):
            return meter.feasible(meter.measure(keep_of(w)))

        start = {g.id: g.size for g in groups}
        # ---- budget: the number of steps from a cost-only dry run (median MACs drop)
        est, w = 0, dict(start)
        while not done(w) and est < int(s["max_steps"]):
            cs = candidates(w, est)
            if not cs:
                break
            drops = sorted((meter.measure(keep_of(apply_edge(graph, w, e, block)))["macs"],
                            i) for i, e in enumerate(cs))
            w = settle(apply_edge(graph, w, cs[drops[len(drops) // 2][1]], block))
            est += 1
        settings = EvalSettings(
            steps=int(s["candidate_steps"]) if s["candidate_steps"] is not None
            else steps_for(ctx, max(1, est) * k),
            lr=ctx.lr, batch_size=ctx.batch_size, optimizer=str(s["optimizer"]), seed=ctx.seed,
            **candidate_scoring(s))

        # ---- resume
        path = Path(ctx.state_dir) / "autoshrink.json"
        fingerprint = {"k": k, "block": float(s["block"]), "blocks": str(s["blocks"]),
                       "mac_weight": float(s["mac_weight"]), "seed": int(ctx.seed),
                       "steps": settings.steps, "inherit": inherit,
                       "constraints": [[c.metric, c.limit] for c in ctx.constraints]}
        log: list[dict] = []
        w = dict(start)
        prev = dict(start)  # the snapshot before the last removal (still above the target)
        if path.exists():
            saved = json.loads(path.read_text())
            if saved.get("fingerprint") != fingerprint:
                raise UserError(f"'{path}' was written with other settings; delete it to "
                                "restart the search")
            log = saved["log"]
            if log:
                w = {int(g): int(v) for g, v in log[-1]["widths"].items()}
            if len(log) > 1:
                prev = {int(g): int(v) for g, v in log[-2]["widths"].items()}
                ctx.log(f"autoshrink: resuming after step {len(log)}")
        base_state = {kk: v.detach().clone() for kk, v in ctx.model.state_dict().items()}

        def current_path(n: int) -> Path:  # the weights after step n (the log's length)
            return Path(ctx.state_dir) / f"autoshrink-current-{n}.pt"

        if inherit == "current" and log:
            if not current_path(len(log)).exists():
                raise UserError(f"'{current_path(len(log))}' is missing (the current network's "
                                f"weights of an inherit=current search); delete '{path}' to "
                                "restart")
            base_state = torch.load(current_path(len(log)), map_location="cpu")
        ctx.log(f"autoshrink: {n_branches} branch edges, channel blocks: {s['blocks']}"
                + f"; about {est} steps of {k} candidates, {settings.steps} fine-tune steps "
                  "each")
        with make_evaluator(ctx, settings, self.name) as ev:
            while not done(w) and len(log) < int(s["max_steps"]):
                step = len(log)
                cs = candidates(w, step)
                if not cs:
                    raise UserError("autoshrink: no edge left to remove and the target is not "
                                    "met; raise the target")
                trials = [settle(apply_edge(graph, w, e, block)) for e in cs]
                res = ev.evaluate([keep_of(t) for t in trials], base_state,
                                  labels=[f"s{step} {e[0]} {e[1]}" for e in cs],
                                  **({"return_state": True} if inherit == "current" else {}))
                scores = [shrink_score(r.accuracy, r.macs, float(s["mac_weight"])) for r in res]
                if not any(math.isfinite(x) for x in scores):
                    raise UserError("autoshrink: no candidate removal of this step could be "
                                    "sliced; see the log")
                best = self.choose(scores)
                for r, sc in zip(res, scores):
                    if not r.cached:
                        ctx.candidates.append({"flops": r.flops, "params": r.params,
                                               "accuracy": r.accuracy,
                                               "label": f"autoshrink {r.label}"})
                prev, w = w, trials[best]
                if inherit == "current":
                    # the next candidates start from the chosen one's trained weights, full
                    # size with zeros at what it dropped (progressive shrinking)
                    base_state = unslim_state(graph, keep_of(w), res[best].state,
                                              like=base_state)
                    save_atomic(base_state, current_path(step + 1), every_rank=True)
                    current_path(step - 1).unlink(missing_ok=True)  # keep this and the last
                log.append({"step": step + 1, "removed": list(cs[best]),
                            "accuracy": res[best].accuracy, "score": scores[best],
                            "flops": res[best].flops, "params": res[best].params,
                            "candidates": [{"edge": list(e), "accuracy": r.accuracy,
                                            "score": sc, "flops": r.flops}
                                           for e, r, sc in zip(cs, res, scores)],
                            "widths": {str(g): v for g, v in w.items()}})
                write_json(path, {"fingerprint": fingerprint, "log": log}, every_rank=True)
                ctx.log(f"autoshrink: step {step + 1}: removed {cs[best][0]} of group "
                        f"{cs[best][1]} (top-1 {100 * res[best].accuracy:.1f}%, "
                        f"{human(res[best].flops, 'FLOPs')}, score {scores[best]:.4f})")
            fresh, cached = ev.fresh, ev.cached
        plan = ctx.land_widths(w, importance_of(order))
        if log and not self._lands(plan, ctx):
            # the last removal overshot the target by more than 1% and the shared step keeps
            # removed edges at 0: land from the snapshot before it, scaled down to the target
            plan = ctx.land_widths(prev, importance_of(order))
        if inherit == "current" and log:
            # channels the landing keeps beyond the last snapshot are zeros in the current
            # weights (and would stay dead through the fine-tuning): the baseline's values
            kept = unslim_state(graph, keep_of(w),
                                {kk: torch.ones_like(v) for kk, v in
                                 slim(graph, keep_of(w)).state_dict().items()}, like=base_state)
            original = ctx.model.state_dict()
            base_state = {kk: torch.where(kept[kk] > 0, v, original[kk])
                          if kk in kept and v.is_floating_point() else v
                          for kk, v in base_state.items()}
        ctx.log(f"autoshrink: {len(log)} steps ({fresh} evaluations run now, {cached} from the "
                f"cache); landed at {human(plan.achieved['flops'], 'FLOPs')}")
        info = {"steps": log, "candidate_steps": settings.steps, "evaluations_run": fresh,
                "evaluations_cached": cached, "channel_blocks": str(s["blocks"])}
        return Proposal(plan, base_state, info)

    @staticmethod
    def _lands(plan, ctx) -> bool:
        """The plan is within 1% below a binding target."""
        return any(plan.achieved.get(c.metric, 0.0) >= LANDED * c.limit for c in ctx.constraints)

    @staticmethod
    def choose(scores: list[float]) -> int:
        """The removal to apply: the best score, the first drawn among equals."""
        return int(np.argmax(scores))



__all__ = ["AutoShrink", "shrink_score", "edges", "apply_edge", "legal", "draw"]
