"""`gensynth`: generative synthesis, the generator-inquisitor loop (METHODS.md section 4).

No public code exists; this is the project's design, faithful to the papers' loop:

- Generator: a survival probability `p[g][c]` per channel of every prunable group and an
  environmental factor `F`. It synthesises a child by sampling `m_c ~ Bernoulli(min(1, F p_c))`
  for every channel the parent still has (children descend from their parent, as offspring
  from their ancestor's genome in evolutionary synthesis: a channel the parent lost stays
  lost). The kept count is rounded to an allowed width (multiple of `round_to`, the full
  size, at least the group's minimum, 0 only for a removable group) by *stochastic* rounding,
  so the expected width is unchanged; rounding up adds the most probable unsampled channels,
  rounding down drops the least probable sampled ones. `init`: "magnitude" (default) starts
  from `p = exp(s - 1)`, `s` = the channel's L2 norm over its group's maximum (Darwin's
  survival law applied to the trained weights), "ones" from `p = 1`.
- Children are evaluated by the candidate evaluator (`graphsearch.evaluator`, the backend
  of `--workers` / `--ray`): the K children of a cycle are one batch, each the parent's
  full-architecture weights sliced to the child's plan (the slim model, `passes.slim`),
  fine-tuned briefly on the training split minus the probe set, scored on validation, and
  probed (below), in parallel, with a training seed from the child's plan and the run's
  seed, so the results do not depend on the number of workers. The evaluator gives back the
  trained slim weights; the chosen child's are mapped back to the full architecture with
  zeros at its dropped channels (`passes.slim.unslim_state`), so the parent stays a
  full-size masked state and the next generation inherits from it by slicing. Every
  evaluation is cached in `ctx.state_dir / "evals-gensynth"` (scores, probe responses,
  weights until their cycle is checkpointed), so a search killed mid-cycle reruns only the
  children that had not finished.
- Inquisitor: a fixed probe set is held out of the training split (`probe_per_class` images
  of every class, never trained on); the stimuli are the whole probe set and its
  class-conditional subsets (up to `probe_classes` classes). On the trained child (in the
  worker, `evaluator.GateResponses`), with a gate of ones at each gate site of the slim
  model requiring grad, the gate gradient is sum(a * dL/da) over the group's producers, so
  the response of a live channel is r_c = mean over stimuli of |dL/dgate_c|. Responses are
  normalised per group and child, `s = r / max r`, and averaged over the children in which
  the channel lives. Generator update: `p <- (1 - eta) p + eta exp(s - 1)`, eta = 0.5, for
  channels alive in at least one child; all other channels decay, `p <- (1 - eta) p` (no
  response is no evidence of use).
- Cycle: the cost ratio r = max over constraints of value / limit steps down by at least
  `step` (20%) per cycle, faster if needed to reach the target by the last cycle (the goal
  is never below the target). `F` is bisected so that the mean cost of `cost_draws` Monte Carlo
  syntheses meets the goal, or `final_aim` (0.97) of the target in the cycle that reaches it
  (not the cost at the expected widths: a conv from a group to itself costs E[w^2] > E[w]^2). K = `children` children are
  sampled and fine-tuned for `ctx.epochs / (cycles * children)` epochs each (16 by default,
  since the twenty-fourth session; the papers' 4-8, and this default until then, is
  `--set children=4`: the same search budget split over a quarter of the draws. On CIFAR at
  1/3 FLOPs the four children of a cycle all fell outside the accuracy tolerance, so the
  parent was the best NetScore of four draws. After the same 5-epoch distilled fine-tune:
  ResNet-32 86.14% and 86.12% validation top-1 over two search seeds against 85.46%,
  ResNet-20 85.72% against 84.12% (under uniform widths there, 84.66-85.16); the search took
  1.3-2 times as long, the candidates' scoring and probes being per child;
  `cifar10_table.md`, twenty-third and twenty-fourth sessions). Hard
  requirements: cost ratio <= goal * (1 + `cost_slack`) (<= 1, every constraint, in the
  final step) and top-1 >= the baseline's minus `accuracy_tolerance`. The eligible children
  are ranked by NetScore, `20 log10(a^2 / (sqrt(p) sqrt(m)))` with a = top-1 in %, p =
  params in millions, m = MACs in millions; the best becomes the next parent. Fallbacks (both
  logged): no child within the accuracy tolerance -> rank the cost-eligible ones; no child
  within the cost step -> the cheapest child. The loop stops when the parent meets every
  target or after `cycles` cycles.
- Landing: every child that reaches the target is itself landed by the shared step
  (`land_final`): every child of the cycle whose goal is the target, and a child of an
  earlier cycle drawn more than 1% under the target; its sampled channels first, then the
  parent's other live channels, by p, never a channel the parent lost; so the syntheses meet
  the target within 1% below and the final plan is the generator's last parent. (Before the
  twenty-fourth session only the final cycle's children were landed: with 16 children a
  cycle, one on the planted test model drew 9 of 16 channels, 10% under the target, in the
  first cycle, won on NetScore, and the final step then revived a channel the parent had
  lost, with zero weights.) `ctx.land(scores)` then runs with scores =
  p, channels the final parent lost at p - 1 (< every live channel): it reproduces the
  parent, and revives a lost channel only when the loop stopped short of the target (the
  share of FLOPs it added is reported, `shared_step_added_flops_share`). The returned state dict is the parent's, with its mask folded
  in (lost channels' norm gamma/beta, or producer rows, at zero), so the slim model computes
  exactly the parent restricted to the plan before the pipeline fine-tunes it.
- `--set netscore_costs=targets` (off by default: the paper's NetScore): NetScore keeps only the
  cost terms the run has a target for (MACs under a FLOPs target), so that a cost the user did
  not constrain is not rewarded; under a FLOPs target the final cycle's children all sit at
  the target, and the paper's params term then trades accuracy for fewer parameters (on CIFAR
  ResNet-20 with a 5x search budget it chose a child 3.5 points under its sibling for 24% fewer
  parameters; `cifar10_table.md`, thirteenth session).
- Refit (`--set refit=true`; off by default, the papers' loop hands its weights on): the
  proposal carries the baseline's weights on the final plan instead of the parent's; the
  loop and its checkpoint are the same either way. Measured on CIFAR ResNet-20 at 1/3 FLOPs
  (`cifar10_table.md`, one seed): 84.36% validation top-1 after the fine-tune against 84.60%
  without: the children's trained weights are a head start, not a bias to undo.
- Resume: every cycle is checkpointed atomically to `ctx.state_dir / "gensynth.pt"` (p, the
  parent's mask and weights, the log, the candidates) before it is logged; children's RNG is
  seeded by (seed, cycle) and their training by their plan and `ctx.seed`, so a rerun with
  the same state directory continues at the next cycle and reaches the same plan; an
  interrupted cycle is synthesised again (the same children) and its finished children are
  read back from the evaluator's cache. The children's cached weights are dropped once their
  cycle is saved.
"""

from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

from .. import checkpoint as ckpt
from ..evaluator import EvalSettings, GateResponses, weights_digest
from ..graph import PlanError
from ..load import UserError
from ..passes.slim import unslim_state
from ..target import LANDED, CostMeter, allowed_widths
from ..train import steps_per_epoch
from .base import Method, Proposal, SearchContext
from .common import (CANDIDATE_BOUNDS, CANDIDATE_SCORING, added_share, candidate_scoring,
                     fold_gates, make_evaluator)
from ..units import human

CHECKPOINT_FORMAT = "graphsearch-gensynth"
CHECKPOINT_VERSION = 2  # 2: children trained as slim models by the candidate evaluator


# --------------------------------------------------------------------------- the mathematics


def netscore(accuracy_pct: float, params: float, macs: float,
             terms: tuple[str, ...] = ("params", "macs")) -> float:
    """NetScore = 20 log10(a^2 / (sqrt(p) sqrt(m))): a = top-1 in %, p = params in millions,
    m = MACs in millions (`params` and `macs` are raw counts). `terms` names the cost terms
    kept (the paper's: both; `netscore_terms`)."""
    p = params / 1e6 if "params" in terms else 1.0
    m = macs / 1e6 if "macs" in terms else 1.0
    if accuracy_pct <= 0:
        return float("-inf")
    return 20.0 * math.log10(accuracy_pct ** 2 / (math.sqrt(p) * math.sqrt(m)))


def netscore_terms(setting: str, metrics: list[str]) -> tuple[str, ...]:
    """The cost terms NetScore keeps: "all" (the paper's: params and MACs) or "targets" (only
    the costs the run has a target for: params for a params target, MACs for any other)."""
    if setting == "all":
        return ("params", "macs")
    if setting == "targets":
        return tuple(sorted({"params" if m == "params" else "macs" for m in metrics}))
    raise UserError(f"gensynth: netscore_costs must be 'all' or 'targets', not {setting!r}")


def generator_update(p: np.ndarray, s: np.ndarray, alive: np.ndarray, eta: float = 0.5
                     ) -> np.ndarray:
    """p <- (1 - eta) p + eta exp(s - 1) where `alive`, (1 - eta) p elsewhere."""
    p = np.asarray(p, dtype=float)
    grown = (1 - eta) * p + eta * np.exp(np.asarray(s, dtype=float) - 1.0)
    return np.where(np.asarray(alive, dtype=bool), grown, (1 - eta) * p)


def normalise(r: np.ndarray, alive: np.ndarray) -> np.ndarray:
    """s = r / max r over the live channels (0 where dead, or when every response is 0)."""
    r = np.where(alive, np.abs(np.asarray(r, dtype=float)), 0.0)
    top = r.max() if r.size else 0.0
    return r / top if top > 0 else np.zeros_like(r)


def select_parent(children: list[dict], limit: float, base_accuracy: float,
                  tolerance: float) -> tuple[dict, str]:
    """The next parent: among the children meeting the hard requirements (cost ratio <=
    `limit`, validation top-1 >= the baseline's minus `tolerance`) the best NetScore (the
    first on ties). Fallbacks: no child within the accuracy tolerance -> best NetScore of the
    cost-eligible ones; none within the cost -> the cheapest child. Returns (child, how)."""
    cost_ok = [c for c in children if c["ratio"] <= limit + 1e-12]
    both = [c for c in cost_ok if c["accuracy"] >= base_accuracy - tolerance]
    if both:
        pool, how = both, "requirements met"
    elif cost_ok:
        pool, how = cost_ok, "no child within the accuracy tolerance: best NetScore"
    else:
        pool = [min(children, key=lambda c: (c["ratio"], children.index(c)))]
        how = "no child within the cost step: the cheapest child"
    return max(pool, key=lambda c: (c["netscore"], -children.index(c))), how


def synthesize_group(rng: np.random.Generator, p: np.ndarray, alive: np.ndarray, F_: float,
                     size: int, min_width: int, round_to: int) -> np.ndarray:
    """Kept channel indices of one group: Bernoulli(min(1, F p)) over the parent's live
    channels `alive` (indices), the count stochastically rounded to an allowed width no
    wider than the parent's."""
    alive = np.asarray(alive, dtype=np.int64)
    n_par = len(alive)
    q = np.clip(F_ * np.asarray(p, dtype=float)[alive], 0.0, 1.0)
    m = rng.random(n_par) < q
    u = rng.random()  # always drawn: the stream stays aligned across F (common numbers)
    n = int(m.sum())
    a = allowed_widths(size, min_width, round_to)
    a = a[a <= n_par]
    if a.size == 0 or a[-1] != n_par:
        a = np.append(a, n_par)  # the parent's own width is always allowed
    lower = a[a <= n]
    upper = a[a >= n]
    if lower.size == 0:
        w = int(upper[0])
    elif upper.size == 0:
        w = int(lower[-1])
    else:
        lo, hi = int(lower[-1]), int(upper[0])
        w = lo if lo == hi else (hi if u < (n - lo) / (hi - lo) else lo)
    # sampled channels first, most probable first; then the unsampled ones, same order
    pp = np.asarray(p, dtype=float)[alive]
    order = np.lexsort((np.arange(n_par), -pp, ~m))
    return np.sort(alive[order[:w]])


# --------------------------------------------------------------------------- the method


class GenerativeSynthesis(Method):
    name = "gensynth"
    summary = ("generator-inquisitor loop: Bernoulli channel survival, gradient-response "
               "probing, NetScore selection, ~20% cost step per cycle")
    cost = ("cycles x children short fine-tunes (the search budget split among them) + "
            "probes; a cycle's children run in parallel (--workers, --ray)")
    defaults = {
        "cycles": 4,
        "children": 16,  # the papers' K is 4-8: see the docstring
        "eta": 0.5,
        "init": "magnitude",  # or "ones"
        "step": 0.2,  # least cost reduction per cycle
        "final_aim": 0.97,  # F aims the expected cost here in the cycle that meets the target
        "cost_slack": 0.05,  # intermediate cycles: children may exceed the goal by this much
        "accuracy_tolerance": 0.05,  # top-1 (fraction) below the baseline still acceptable
        "probe_per_class": 8,
        "probe_classes": 16,
        "cost_draws": 16,  # Monte Carlo syntheses per F when bisecting F
        "land_final": True,  # children that reach the target are landed on it (docstring)
        "refit": False,  # True: the fine-tuning starts from the baseline's weights on the plan
        "netscore_costs": "all",  # or "targets": only the costs with a target (netscore_terms)
        **CANDIDATE_SCORING,  # the candidate score (methods/common.py)
    }
    choices = {"init": ("magnitude", "ones"), "netscore_costs": ("all", "targets")}
    bounds = {"cycles": "[1, inf)", "children": "[1, inf)", "eta": "[0, 1]", "step": "[0, 1)",
              "final_aim": "(0, 1]", "cost_slack": "[0, inf)", "accuracy_tolerance": "[0, 1]",
              "probe_per_class": "[1, inf)", "probe_classes": "[1, inf)",
              "cost_draws": "[1, inf)", **CANDIDATE_BOUNDS}

    def search(self, ctx: SearchContext) -> Proposal:
        s = self.settings_of(ctx)
        baseline = _clone(ctx.model.state_dict()) if s["refit"] else None
        cycles, K = int(s["cycles"]), int(s["children"])
        eta = float(s["eta"])
        groups = ctx.graph.prunable_groups
        ev = CostMeter(ctx.graph, ctx.constraints, ctx.latency_model)
        terms = netscore_terms(str(s["netscore_costs"]), [c.metric for c in ctx.constraints])
        path = Path(ctx.state_dir) / "gensynth.pt"
        fingerprint = {
            "version": CHECKPOINT_VERSION,
            "settings": {k: s[k] for k in sorted(self.defaults) if k != "refit"
                         and not (k == "netscore_costs" and s[k] == "all")},  # old runs resume
            "epochs": float(ctx.epochs), "seed": int(ctx.seed), "lr": float(ctx.lr),
            "batch_size": int(ctx.batch_size), "round_to": int(ctx.round_to),
            "constraints": [[c.metric, float(c.limit)] for c in ctx.constraints],
            "groups": [[g.id, g.size] for g in groups]}

        probe_x, probe_y, held = _probe_split(ctx.data.train, int(s["probe_per_class"]),
                                              ctx.seed)
        stimuli = _stimuli(probe_x, probe_y, int(s["probe_classes"]), ctx.seed)
        probe = GateResponses(stimuli)
        child_epochs = float(ctx.epochs) / (cycles * K)
        child_steps = max(1, int(round(child_epochs * steps_per_epoch(len(held),
                                                                      ctx.batch_size, 1))))
        settings = EvalSettings(steps=child_steps, lr=ctx.lr, batch_size=ctx.batch_size,
                                optimizer="sgd", seed=ctx.seed, **candidate_scoring(s))
        # children train on the training split minus the probe images (named in the key)
        ev_data = SimpleNamespace(train=held, val=ctx.data.val)
        data_tag = "train minus the probe images " + _digest(probe_x, probe_y)

        def ratio(values: dict) -> float:
            return max(values[c.metric] / c.limit for c in ctx.constraints)

        def measure(keep: dict) -> dict:
            return ev.measure({g: list(map(int, v)) for g, v in keep.items()})

        # ---- the state: fresh or resumed
        state = _load(path, fingerprint)
        resumed_from = None
        if state is None:
            base_acc = ctx.evaluate(ctx.model)
            p = _initial_p(ctx, s["init"])
            alive = {g.id: np.arange(g.size) for g in groups}
            parent_state = _clone(ctx.model.state_dict())
            parent_acc, log, done, start = base_acc, [], False, 1
        else:
            base_acc = state["base_accuracy"]
            p = {int(g): v.double().numpy() for g, v in state["p"].items()}
            alive = {int(g): np.asarray(v, dtype=np.int64) for g, v in state["alive"].items()}
            parent_state = state["parent_state"]
            parent_acc, log, done = state["parent_accuracy"], state["log"], state["done"]
            start = state["cycle"] + 1
            resumed_from = state["cycle"]
            ctx.candidates.extend(state["candidates"])
            ctx.log(f"gensynth: resumed after cycle {state['cycle']} from {path}")
        sizes = {g.id: g.size for g in groups}
        new_cycles = 0

        def keep_of(al: dict) -> dict:
            return {gid: v for gid, v in al.items() if len(v) < sizes[gid]}

        with make_evaluator(ctx, settings, self.name, data=ev_data,
                            data_tag=data_tag) as evaluator:
            for cycle in range(start, cycles + 1):
                parent_values = measure(keep_of(alive))
                r_par = ratio(parent_values)
                if done or r_par <= 1.0:
                    done = True
                    break
                new_cycles += 1
                remaining = cycles - cycle + 1
                factor = min(1.0 - float(s["step"]), (1.0 / r_par) ** (1.0 / remaining))
                goal = max(1.0, r_par * factor)
                final = goal <= 1.0 + 1e-12
                aim = float(s["final_aim"]) if final else goal
                limit = 1.0 if final else goal * (1.0 + float(s["cost_slack"]))
                F_ = float(self._bisect_F(p, alive, aim, ratio, ev, groups, ctx.round_to,
                                                ctx.seed, cycle, int(s["cost_draws"])))
                rng = np.random.default_rng([int(ctx.seed), cycle])
                synthesised = []
                for j in range(K):
                    kept = {g.id: synthesize_group(rng, p[g.id], alive[g.id], F_, g.size,
                                                   g.min_width, ctx.round_to) for g in groups}
                    if final and s["land_final"]:
                        kept = self._land_child(ctx, kept, alive, p, groups)
                    kept, values = self._valid(kept, alive, p, groups, ctx.round_to, measure)
                    if values is None:
                        ctx.log(f"gensynth: cycle {cycle} child {j}: no valid plan, skipped")
                        continue
                    if not final and s["land_final"] and ratio(values) < LANDED:
                        # drawn under the target before the final cycle: it has reached the
                        # target, so it is landed as the final cycle's children are
                        landed, lv = self._valid(self._land_child(ctx, kept, alive, p, groups),
                                                 alive, p, groups, ctx.round_to, measure)
                        if lv is not None:
                            kept, values = landed, lv
                    synthesised.append((f"gensynth c{cycle}.{j}", kept, values))
                # ---- the cycle's children: trained, scored and probed as one batch
                results = evaluator.evaluate(
                    [{gid: [int(i) for i in v] for gid, v in keep_of(kept).items()}
                     for _, kept, _ in synthesised], parent_state,
                    labels=[label for label, _, _ in synthesised], return_state=True,
                    probe=probe)
                children = []
                for (label, kept, values), r in zip(synthesised, results):
                    if r.error:
                        ctx.log(f"gensynth: {label}: not evaluated ({r.error}), skipped")
                        continue
                    acc = float(r.accuracy)
                    score = netscore(100.0 * acc, values["params"], values["macs"], terms)
                    children.append({
                        "label": label, "kept": kept, "values": values, "ratio": ratio(values),
                        "accuracy": acc, "netscore": score, "responses": r.probe,
                        "state": r.state, "cached": r.cached})
                    ctx.candidates.append({"flops": values["flops"], "params": values["params"],
                                           "accuracy": acc, "label": label})
                if not children:
                    raise UserError(f"gensynth: cycle {cycle} synthesised no valid child; the "
                                    "model's removable groups may need round_to 1")
                # ---- the hard requirements, then NetScore
                best, how = select_parent(children, limit, base_acc, float(s["accuracy_tolerance"]))
                # ---- the generator update from every child's responses
                for g in groups:
                    total = np.zeros(g.size)
                    count = np.zeros(g.size)
                    for c in children:
                        live = np.zeros(g.size, dtype=bool)
                        live[c["kept"][g.id]] = True
                        r = c["responses"].get(g.id, np.ones(g.size))
                        total += np.where(live, normalise(r, live), 0.0)
                        count += live
                    seen = count > 0
                    s_mean = np.where(seen, total / np.maximum(count, 1), 0.0)
                    p[g.id] = generator_update(p[g.id], s_mean, seen, eta)
                alive = {gid: np.asarray(v, dtype=np.int64) for gid, v in best["kept"].items()}
                # the chosen child's trained slim weights, full-size with zeros where it dropped
                parent_state = unslim_state(ctx.graph, keep_of(alive), best["state"],
                                            like=parent_state)
                parent_acc = best["accuracy"]
                entry = {
                    "cycle": cycle, "F": F_, "parent_ratio": r_par, "goal_ratio": goal,
                    "requirement_ratio": limit, "selection": how, "chosen": best["label"],
                    "children": [{"label": c["label"], "flops": c["values"]["flops"],
                                  "params": c["values"]["params"], "macs": c["values"]["macs"],
                                  "ratio": c["ratio"], "accuracy": c["accuracy"],
                                  "netscore": c["netscore"], "cached": c["cached"],
                                  "widths": {str(g): len(v) for g, v in c["kept"].items()}}
                                 for c in children]}
                log.append(entry)
                done = ratio(best["values"]) <= 1.0
                ckpt.save_atomic({
                    "format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION,
                    "fingerprint": fingerprint, "cycle": cycle, "done": done,
                    "base_accuracy": base_acc, "parent_accuracy": parent_acc,
                    "p": {str(g): torch.from_numpy(np.asarray(v, dtype=np.float64))
                          for g, v in p.items()},
                    "alive": {str(g): [int(i) for i in v] for g, v in alive.items()},
                    "parent_state": parent_state, "log": log,
                    "candidates": [dict(c) for c in ctx.candidates]}, path)
                evaluator.discard_states(results)  # the cycle is saved: its children's weights go
                ctx.log(f"gensynth: cycle {cycle}/{cycles}: F {F_:.3f}, cost ratio {r_par:.3f} -> "
                        f"goal {goal:.3f}; children " + ", ".join(
                            f"{c['label']} r={c['ratio']:.3f} top-1={100 * c['accuracy']:.1f}% "
                            f"NS={c['netscore']:.2f}" for c in children)
                        + f"; chose {best['label']} ({how})")
                if done:
                    break
            fresh, cached, backend = evaluator.fresh, evaluator.cached, evaluator.backend
        # ---- land with the shared target step
        ctx.model.load_state_dict(parent_state)
        masks = {gid: _mask(sizes[gid], v) for gid, v in alive.items() if len(v) < sizes[gid]}
        fold_gates(ctx, masks)
        scores = {}
        for g in groups:
            sc = p[g.id].astype(float).copy()
            dead = np.ones(g.size, dtype=bool)
            dead[alive[g.id]] = False
            sc[dead] -= 1.0
            scores[g.id] = sc
        plan = ctx.land(scores)
        parent_values = measure(keep_of(alive))
        added = added_share(ctx.graph, alive, plan)
        chosen = None
        if log:
            last = log[-1]
            chosen = next((c for c in last["children"] if c["label"] == last["chosen"]), None)
        info = {"cycles_run": len(log),
                "children_per_cycle": [len(e["children"]) for e in log],
                "chosen_netscore": chosen["netscore"] if chosen else None,
                "chosen_accuracy": chosen["accuracy"] if chosen else None,
                "selection": [e["selection"] for e in log],
                "shared_step_added_flops_share": added["flops_share_added"],
                "shared_step_added_channels": added["channels_added"],
                "cycles": log, "base_accuracy": base_acc, "parent_accuracy": parent_acc,
                "parent_cost": parent_values, "targets_met_by_parent": ratio(parent_values) <= 1,
                "resumed_from_cycle": resumed_from, "new_cycles": new_cycles,
                "probe_images": int(len(probe_y)), "child_epochs": child_epochs,
                "child_steps": child_steps, "evaluations_run": fresh,
                "evaluations_cached": cached, "evaluator": backend}
        ctx.log(f"gensynth: {len(log)} cycles; parent top-1 {100 * parent_acc:.2f}% at cost "
                f"ratio {ratio(parent_values):.3f}; landed at "
                f"{human(plan.achieved['flops'], 'FLOPs')}")
        info["refit"] = bool(s["refit"])
        if s["refit"]:
            # the loop chose the architecture; the fine-tuning starts from the baseline's
            # weights on it (as group lasso's, MorphNet's and vardrop's refits do) instead of
            # the children's trained ones (measured worse: module docstring)
            ctx.model.load_state_dict(baseline)
            ctx.log("gensynth: the plan's channels restart from the baseline's weights (refit)")
        return Proposal(plan, _clone(ctx.model.state_dict()), info)

    # ---- helpers
    @staticmethod
    def _land_child(ctx, kept, alive, p, groups) -> dict:
        """A final-cycle child, landed on the target by the shared step: its sampled
        channels first (by p), then the parent's other live channels (by p), never a channel
        the parent lost; so the child, and the parent it may become, meets every target
        within 1% below, and the final plan is that parent, not a plan the shared step
        fills up later."""
        scores = {}
        for g in groups:
            sc = np.full(g.size, -np.inf)
            sc[alive[g.id]] = p[g.id][alive[g.id]]
            sc[kept[g.id]] = p[g.id][kept[g.id]] + 2.0
            scores[g.id] = sc
        try:
            plan = ctx.land(scores)
        except (UserError, PlanError):
            return kept
        return {g.id: np.asarray(plan.keep.get(g.id, np.arange(g.size)), dtype=np.int64)
                for g in groups}

    @staticmethod
    def _bisect_F(p, alive, aim, ratio, ev, groups, round_to, seed, cycle, draws) -> float:
        """The largest F whose children cost at most `aim` (a cost ratio) on average over
        `draws` Monte Carlo syntheses. The same random numbers serve every F (common random
        numbers), so the estimate is smooth and monotone enough to bisect. A Monte Carlo
        mean, not the cost at the expected widths: a conv from a group to itself (inside a
        residual stage) costs E[w^2] > E[w]^2, which would bias every child above the goal."""
        def cost_at(F_: float) -> float:
            rng = np.random.default_rng([int(seed), int(cycle), 1])
            total = 0.0
            for _ in range(draws):
                widths = {g.id: len(synthesize_group(rng, p[g.id], alive[g.id], F_, g.size,
                                                     g.min_width, round_to)) for g in groups}
                widths = {gid: max(w, 1) if len(alive[gid]) else 0
                          for gid, w in widths.items()}
                try:
                    total += ratio(ev.measure(widths))
                except PlanError:
                    return float("inf")
            return total / draws

        lows = [p[g][alive[g]].min() for g in p if len(alive[g])]
        hi = 1.0 / max(min(lows), 1e-12) if lows else 1.0
        lo = 0.0
        if cost_at(hi) <= aim:
            return hi
        for _ in range(30):
            mid = 0.5 * (lo + hi)
            if cost_at(mid) <= aim:
                lo = mid
            else:
                hi = mid
        return lo

    @staticmethod
    def _valid(kept, alive, p, groups, round_to, measure):
        """The child's measured cost; a removable group emptied in a way the model forbids
        gets its smallest non-zero width back."""
        try:
            return kept, measure({g: v for g, v in kept.items()
                                  if len(v) < next(x.size for x in groups if x.id == g)})
        except PlanError:
            pass
        fixed = dict(kept)
        for g in groups:
            if len(kept[g.id]) == 0 and len(alive[g.id]):
                a = allowed_widths(g.size, g.min_width, round_to)
                w = int(min(a[a > 0][0], len(alive[g.id])))
                order = np.lexsort((alive[g.id], -p[g.id][alive[g.id]]))
                fixed[g.id] = np.sort(alive[g.id][order[:w]])
        try:
            return fixed, measure({g: v for g, v in fixed.items()
                                   if len(v) < next(x.size for x in groups if x.id == g)})
        except PlanError:
            return kept, None


# --------------------------------------------------------------------------- probing


def _mask(size: int, kept) -> torch.Tensor:
    m = torch.zeros(size)
    m[torch.as_tensor(np.asarray(kept, dtype=np.int64))] = 1.0
    return m


def _clone(state: dict) -> dict:
    return {k: v.detach().clone().cpu() for k, v in state.items()}


def _initial_p(ctx: SearchContext, init: str) -> dict[int, np.ndarray]:
    p = {g.id: np.ones(g.size) for g in ctx.graph.prunable_groups}
    if init == "ones":
        return p
    if init != "magnitude":
        raise UserError(f"gensynth: init {init!r}: choose 'magnitude' or 'ones'")
    with torch.no_grad():
        norms = ctx.channel_norms()
    for gid, n in norms.items():
        n = n.double().cpu().numpy()
        if n.max() > 0:
            p[gid] = np.exp(n / n.max() - 1.0)
    return p


def _probe_split(dataset, per_class: int, seed: int):
    """(probe images, probe labels, the training split without them): `per_class` images of
    every class with at least two, chosen by `seed`, never augmented."""
    from ..data import ImageTensorDataset

    if hasattr(dataset, "labels"):
        labels = torch.as_tensor(dataset.labels).long()
    else:
        labels = torch.tensor([int(dataset[i][1]) for i in range(len(dataset))])
    g = torch.Generator().manual_seed(int(seed) + 7919)
    probe = []
    for c in torch.unique(labels).tolist():
        idx = (labels == c).nonzero().flatten()
        idx = idx[torch.randperm(len(idx), generator=g)]
        probe.append(idx[:max(0, min(per_class, len(idx) - 1))])
    probe_idx = torch.cat(probe).sort().values if probe else torch.zeros(0, dtype=torch.long)
    rest = torch.ones(len(labels), dtype=torch.bool)
    rest[probe_idx] = False
    rest_idx = rest.nonzero().flatten()
    if isinstance(dataset, ImageTensorDataset):
        x, y = dataset.get_batch(probe_idx, augment=False)
        held = dataset.subset(rest_idx.tolist())
    else:
        items = [dataset[int(i)] for i in probe_idx]
        x = torch.stack([torch.as_tensor(a) for a, _ in items]) if items else torch.zeros(0)
        y = torch.tensor([int(b) for _, b in items], dtype=torch.long)
        held = torch.utils.data.Subset(dataset, rest_idx.tolist())
    return x, y, held


def _digest(x: torch.Tensor, y: torch.Tensor) -> str:

    return weights_digest({"x": x, "y": y})[:16]


def _stimuli(x: torch.Tensor, y: torch.Tensor, max_classes: int, seed: int):
    """The whole probe set and its class-conditional subsets (up to `max_classes`)."""
    out = [(x, y)] if len(y) else []
    classes = torch.unique(y)
    if len(classes) > max_classes:
        g = torch.Generator().manual_seed(int(seed) + 104729)
        classes = classes[torch.randperm(len(classes), generator=g)[:max_classes]].sort().values
    for c in classes.tolist():
        sel = y == c
        out.append((x[sel], y[sel]))
    return out


# --------------------------------------------------------------------------- checkpoint


def _load(path: Path, fingerprint: dict):
    if not path.exists():
        return None
    try:
        state = ckpt.load(path)
    except Exception as exc:  # noqa: BLE001
        raise UserError(f"cannot read '{path}' ({exc}); delete it to restart the search") from exc
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise UserError(f"'{path}' is not a gensynth checkpoint; delete it to restart")
    if state.get("fingerprint") != fingerprint:
        raise UserError(f"'{path}' was written with other settings; delete it to restart the "
                        "search")
    return state


__all__ = ["GenerativeSynthesis", "netscore", "netscore_terms", "generator_update", "normalise",
           "select_parent", "synthesize_group"]
