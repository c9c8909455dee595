"""`submodular`: resource-constrained search under a submodularity assumption (Xiong et al.
2019; METHODS.md section 6), on the traced model's channel groups.

- Elements: (group g, k-th increment of ceil(C_g / K) channels), K = `increments`; a group's
  channels are added strongest first (baseline L2 norm), increment k is eligible only once
  k - 1 is in. A removable group (a residual or concat branch) starts off and its first
  increment is the "branch on" element. The seed set: one increment per non-removable group
  (and per branch that may not go together with the others, e.g. the last branch of a
  concat); when the seed exceeds the target, K doubles until it fits. Elements are ordered
  by increment, then group: CELF gives equal keys to the earlier element, so where F cannot
  tell elements apart the groups grow round robin (about uniform's widths), not the first
  stage first (the 24k-parameter plan of cifar10_table.md, 2026-11-30).
- F(S): validation top-1 after a short fine-tune of the baseline's weights sliced to S (the
  candidate evaluator: fixed seeds and data order, every evaluation cached by plan).
- Cost-effective lazy greedy (CELF), three passes: pure gain, gain per parameter, gain per
  FLOP. Each pass keeps a priority queue of upper bounds; a stale key popped on top is
  re-evaluated (with the next stale ones, up to the evaluator's parallelism, in one batch)
  and pushed back, a fresh one on top is accepted. Marginal costs are recomputed with every
  evaluation (FLOPs are bilinear in the widths); an element whose addition breaks the budget
  is dropped (costs only grow as S grows). The best of the three final sets by F wins.
- Landing: the winner's widths go through the shared target step (`ctx.land_widths`, one
  bisected multiplier, channels ranked by the same norm order).
- `direction=backward`, the default (this implementation's addition; `--set
  direction=forward` for the paper's search above): CELF in reverse, from the full model. The element whose removal loses the least F per unit of the binding target's metric
  it saves goes first (for a submodular F a removal's loss only grows as the set shrinks, so
  stale losses are lower bounds and the lazy evaluation holds), the highest increments
  first, until the target holds; candidates are scored on the sliced weights after adaptive
  BN, no training step (`candidate_steps` 0 unless set), on the whole validation split
  (`candidate_val_samples` 0 unless set: neighbouring candidates differ by a fraction of a
  point, under the noise of a fixed draw of 1,000 images; measured on CIFAR ResNet-20 at 1/3
  FLOPs with the same fine-tune: 85.53% validation top-1 against the draw's 84.47%, three
  seeds each, search 496-677 s against 108-165 s, about one fine-tune's time;
  `cifar10_table.md`). Why: forward, every candidate is a
  network at a quarter of its widths or less, whose score after about one fine-tuning step
  is near chance (measured on CIFAR ResNet-20 at 1/3 FLOPs: the three passes ended at F =
  19.4%, 16.4% and 11.8%, and the search chose among them on noise); backward, every
  candidate is a network near the baseline, whose loss of accuracy is measurable. Measured
  with the same budget and fine-tune (`benchmarks/results/cifar10_table.md`, seventh session):
  backward 84.47% val / 84.59% test (three fine-tuning seeds) against forward's 80.92% /
  81.48% (one); uniform widths 84.83% / 84.47%.
- Resume: every finished evaluation is in `ctx.state_dir / "evals-submodular"`; passes are
  deterministic, so a rerun replays the finished part from the cache and continues. Each
  finished pass is also recorded in `submodular.json`.
"""

from __future__ import annotations

import heapq
import math
from pathlib import Path
from typing import Callable, Hashable, Sequence

import numpy as np

from ..checkpoint import write_json
from ..evaluator import EvalSettings
from ..evaluator.candidate import OPTIMIZERS
from ..graph import PlanError
from ..load import UserError
from ..target import CostMeter, legal_zeros
from .base import Method, Proposal, SearchContext
from .common import (CANDIDATE_BOUNDS, CANDIDATE_SCORING, binding_metric, candidate_scoring,
                     channel_order, importance_of, keep_of_widths, make_evaluator, steps_for)
from ..units import human


# --------------------------------------------------------------------------- lazy greedy


class Counted:
    """F with a cache and a count of distinct evaluations. `batch(sets)` -> values."""

    def __init__(self, batch: Callable[[list[frozenset]], list[float]]):
        self._batch = batch
        self.cache: dict[frozenset, float] = {}
        self.calls = 0

    def many(self, sets: Sequence[frozenset]) -> list[float]:
        new = [s for s in dict.fromkeys(sets) if s not in self.cache]
        if new:
            for s, v in zip(new, self._batch(new)):
                self.cache[s] = float(v)
            self.calls += len(new)
        return [self.cache[s] for s in sets]

    def __call__(self, s: frozenset) -> float:
        return self.many([s])[0]


def lazy_greedy(elements: Sequence[Hashable], F: Counted, seed: frozenset,
                eligible: Callable[[Hashable, frozenset], bool],
                fits: Callable[[frozenset], bool],
                cost: Callable[[Hashable, frozenset], float] | None = None,
                batch: int = 1, max_evaluations: int | None = None) -> list[Hashable]:
    """CELF: the elements added to `seed`, in order. Keys are marginal gains, divided by
    `cost(e, S)` (the marginal cost, recomputed whenever the key is) when given. A stale key on
    top is re-evaluated, together with up to `batch - 1` further stale entries; a fresh key on
    top is accepted if `fits(S + e)`, dropped otherwise. Ties go to the earlier element. After
    `max_evaluations` distinct evaluations of F, stale keys are trusted as they are (elements
    never evaluated keep their infinite bound: they go first, in order)."""
    index = {e: i for i, e in enumerate(elements)}
    S = frozenset(seed)
    added: list = []
    version = 0
    heap: list = [(-math.inf, index[e], -1) for e in elements
                  if e not in S and eligible(e, S)]
    queued = {elements[i] for _, i, _ in heap}
    heapq.heapify(heap)

    def key_of(e, value, base):
        gain = value - base
        if cost is None:
            return gain
        return gain / max(cost(e, S), 1e-12)

    while heap:
        neg, i, ver = heap[0]
        e = elements[i]
        if ver == version or (max_evaluations is not None and F.calls >= max_evaluations):
            heapq.heappop(heap)
            queued.discard(e)
            if not fits(S | {e}):
                continue  # costs only grow with S: it never fits again
            S = S | {e}
            added.append(e)
            version += 1
            for f in elements:
                if f not in S and f not in queued and eligible(f, S):
                    heapq.heappush(heap, (-math.inf, index[f], -1))
                    queued.add(f)
            continue
        # re-evaluate the stale top (and the next stale ones) in one batch
        stale = []
        while heap and len(stale) < max(1, batch) and heap[0][2] != version:
            stale.append(heapq.heappop(heap))
        sets = [S | {elements[j]} for _, j, _ in stale]
        base = F(S)
        values = F.many(sets)
        for (_, j, _), v in zip(stale, values):
            heapq.heappush(heap, (-key_of(elements[j], v, base), j, version))
    return added


def plain_greedy(elements: Sequence[Hashable], F: Counted, seed: frozenset,
                 eligible: Callable[[Hashable, frozenset], bool],
                 fits: Callable[[frozenset], bool],
                 cost: Callable[[Hashable, frozenset], float] | None = None) -> list[Hashable]:
    """The plain greedy (every candidate re-evaluated every round): the reference CELF must
    agree with on a submodular F. Same keys and tie-breaking as `lazy_greedy`."""
    S = frozenset(seed)
    added: list = []
    while True:
        cands = [e for e in elements if e not in S and eligible(e, S) and fits(S | {e})]
        if not cands:
            return added
        base = F(S)
        values = F.many([S | {e} for e in cands])
        keys = [(v - base) / (max(cost(e, S), 1e-12) if cost is not None else 1.0)
                for e, v in zip(cands, values)]
        best = cands[int(np.argmax(keys))]  # argmax: the first of equal keys
        S = S | {best}
        added.append(best)


def lazy_backward(elements: Sequence[Hashable], F: Counted, start: frozenset,
                  removable: Callable[[Hashable, frozenset], bool],
                  fits: Callable[[frozenset], bool],
                  saving: Callable[[Hashable, frozenset], float] | None = None,
                  batch: int = 1, max_evaluations: int | None = None) -> list[Hashable]:
    """CELF in reverse: from `start`, remove the element whose removal loses the least F
    (divided by `saving(e, S)`, what the removal saves, recomputed with the key, when given),
    one at a time, until `fits(S)`. For a submodular F the loss of removing e (its marginal
    gain at S - e) only grows as S shrinks, so a stale loss is a lower bound: the smallest
    stale key is re-evaluated (with up to `batch - 1` further stale ones), a fresh one on top
    is taken. Ties go to the earlier element. After `max_evaluations` distinct evaluations,
    stale keys are trusted (never evaluated: removed first, in order). Returns the removed
    elements in order."""
    index = {e: i for i, e in enumerate(elements)}
    S = frozenset(start)
    removed: list = []
    version = 0
    heap: list = []
    queued: set = set()

    def enqueue() -> None:
        for f in elements:
            if f in S and f not in queued and removable(f, S):
                heapq.heappush(heap, (-math.inf, index[f], -1))
                queued.add(f)

    enqueue()
    while heap and not fits(S):
        key, i, ver = heap[0]
        e = elements[i]
        if ver == version or (max_evaluations is not None and F.calls >= max_evaluations):
            heapq.heappop(heap)
            queued.discard(e)
            if e not in S or not removable(e, S):
                continue
            S = S - {e}
            removed.append(e)
            version += 1
            enqueue()
            continue
        stale = []
        while heap and len(stale) < max(1, batch) and heap[0][2] != version:
            stale.append(heapq.heappop(heap))
        base = F(S)
        values = F.many([S - {elements[j]} for _, j, _ in stale])
        for (_, j, _), v in zip(stale, values):
            loss = base - v
            if saving is not None:
                loss = loss / max(saving(elements[j], S), 1e-12)
            heapq.heappush(heap, (loss, j, version))
    return removed


def plain_backward(elements: Sequence[Hashable], F: Counted, start: frozenset,
                   removable: Callable[[Hashable, frozenset], bool],
                   fits: Callable[[frozenset], bool],
                   saving: Callable[[Hashable, frozenset], float] | None = None
                   ) -> list[Hashable]:
    """The plain backward greedy (every removal re-evaluated every round): the reference
    `lazy_backward` must agree with on a submodular F."""
    S = frozenset(start)
    removed: list = []
    while not fits(S):
        cands = [e for e in elements if e in S and removable(e, S)]
        if not cands:
            return removed
        base = F(S)
        values = F.many([S - {e} for e in cands])
        keys = [(base - v) / (max(saving(e, S), 1e-12) if saving is not None else 1.0)
                for e, v in zip(cands, values)]
        worst = cands[int(np.argmin(keys))]
        S = S - {worst}
        removed.append(worst)
    return removed


# --------------------------------------------------------------------------- the method


class Sets:
    """What a set of elements (group, increment) stands for: the widths (a group's count of
    increments times its increment), the plan keeping each group's strongest channels, its
    cost (None where the graph cannot realise it, cached) and whether it meets the targets."""

    def __init__(self, graph, order, inc: dict[int, int], meter: CostMeter) -> None:
        self.graph, self.order, self.inc, self.meter = graph, order, inc, meter
        self._counts: dict[frozenset, dict[int, int]] = {}
        self._costs: dict[frozenset, dict | None] = {}

    def counts(self, S: frozenset) -> dict[int, int]:
        if S not in self._counts:
            c = {gid: 0 for gid in self.inc}
            for gid, k in S:
                c[gid] = max(c[gid], k)
            self._counts[S] = c
        return self._counts[S]

    def widths_of(self, S: frozenset) -> dict[int, int]:
        return {gid: min(self.graph.groups[gid].size, c * self.inc[gid])
                for gid, c in self.counts(S).items()}

    def keep_of(self, S: frozenset) -> dict[int, list[int]]:
        return keep_of_widths(self.graph, self.order, self.widths_of(S))

    def measure(self, S: frozenset):
        if S not in self._costs:
            try:
                self._costs[S] = self.meter.measure(self.keep_of(S))
            except PlanError:
                self._costs[S] = None
        return self._costs[S]

    def fits(self, S: frozenset) -> bool:
        v = self.measure(S)
        return v is not None and self.meter.feasible(v)


class Submodular(Method):
    name = "submodular"
    summary = ("resource-constrained lazy greedy (CELF) over channel increments and branches, "
               "three passes (gain, gain/param, gain/FLOP), best of the three")
    cost = ("about 2 candidate fine-tunes per element (groups x increments), the search "
            "budget split among them; evaluations run in parallel (--workers, --ray)")
    defaults = {
        "increments": 4,  # K: a group grows by ceil(C/K) channels at a time
        "candidate_steps": None,  # fine-tune steps per candidate (None: from the budget)
        "max_evaluations": None,  # per pass; then stale keys are trusted (None: no cap)
        "optimizer": "sgd",
        "direction": "backward",  # from the full model; "forward": the paper's (docstring)
        **CANDIDATE_SCORING,  # the candidate score (methods/common.py)
        # validation samples a candidate is scored on; None: the whole split backward (where
        # neighbouring candidates differ by little), CANDIDATE_SCORING's fixed draw forward
        "candidate_val_samples": None,
    }
    choices = {"optimizer": OPTIMIZERS, "direction": ("backward", "forward")}
    bounds = {"increments": "[1, inf)", "max_evaluations": "[1, inf)",
              "candidate_steps": "[0, inf)", **CANDIDATE_BOUNDS}

    def search(self, ctx: SearchContext) -> Proposal:
        s = self.settings_of(ctx)
        K = int(s["increments"])
        graph = ctx.graph
        groups = graph.prunable_groups
        order = channel_order(ctx)
        meter = CostMeter(graph, ctx.constraints, ctx.latency_model)
        direction = str(s["direction"]).lower()
        if direction == "backward":
            return self._backward(ctx, s, K, order, meter)
        # the seed (one increment per group) must fit: finer increments until it does
        while True:
            seed_w = {g.id: 0 if g.removable else max(1, math.ceil(g.size / K)) for g in groups}
            # removable branches that may not all go together: some start on (one increment)
            seed_w = legal_zeros(graph, seed_w,
                                 {g.id: np.array([0, max(1, math.ceil(g.size / K))])
                                  for g in groups},
                                 keep_of=lambda w: keep_of_widths(graph, order, w))
            try:
                fits_seed = meter.feasible(meter.measure(
                    keep_of_widths(graph, order, seed_w)))
            except PlanError:
                fits_seed = False
            if fits_seed or K >= max(g.size for g in groups):
                break
            K *= 2
            ctx.log(f"submodular: the seed exceeds the target; {K} increments per group")
        inc = {g.id: max(1, math.ceil(g.size / K)) for g in groups}
        steps_of = {g.id: math.ceil(g.size / inc[g.id]) for g in groups}
        # Equal keys go to the earlier element (lazy_greedy), so the element order is the
        # search's answer wherever F cannot tell elements apart (every candidate at chance:
        # all gains 0). By increment first, then group: a round robin that grows every group
        # alike, i.e. about uniform's widths. In the graph's order (group first) the first
        # stage, the costliest channels per parameter, took the budget: 24k parameters kept
        # at 1/3 FLOPs on CIFAR ResNet-20 (uniform keeps 92k), 16 points under uniform.
        elements = sorted(((g.id, k) for g in groups
                           for k in range(1 if g.removable else 2, steps_of[g.id] + 1)),
                          key=lambda e: (e[1], e[0]))
        seed = frozenset((g.id, 1) for g in groups if seed_w[g.id] > 0)

        sets = Sets(graph, order, inc, meter)
        widths_of, keep_of, measure, fits = sets.widths_of, sets.keep_of, sets.measure, sets.fits

        def eligible(e, S) -> bool:
            gid, k = e
            return k == 1 or (gid, k - 1) in S

        if measure(seed) is None or not fits(seed):
            raise UserError("submodular: the seed (one increment of every group, removable "
                            "branches off) already exceeds the target; raise the target or "
                            "increments")
        settings, state_path, base_state = self._setup(
            ctx, s, steps_for(ctx, 2 * max(len(elements), 1)),
            CANDIDATE_SCORING["candidate_val_samples"])
        with make_evaluator(ctx, settings, self.name) as ev:
            F = Counted(self._scorer(ctx, ev, keep_of, base_state))
            ctx.log(f"submodular: {len(elements)} elements over {len(groups)} groups, "
                    f"{settings.steps} fine-tune steps per candidate, {ev.backend}")
            passes = []
            cost_fns = {"gain": None,
                        "gain/param": lambda e, S: _marginal(measure, S, e, "params"),
                        "gain/flop": lambda e, S: _marginal(measure, S, e, "flops")}
            for name, cost_fn in cost_fns.items():
                added = lazy_greedy(elements, F, seed, eligible, fits, cost_fn,
                                    batch=ev.parallelism,
                                    max_evaluations=None if s["max_evaluations"] is None
                                    else F.calls + int(s["max_evaluations"]))
                S = seed | frozenset(added)
                value = F(S)
                passes.append({"pass": name, "added": [list(e) for e in added],
                               "accuracy": value, "widths": {str(g): w for g, w in
                                                             widths_of(S).items()},
                               **(measure(S) or {}), "evaluations_so_far": F.calls})
                ctx.log(f"submodular: pass '{name}': {len(added)} elements added, F = "
                        f"{100 * value:.2f}% at {human(measure(S)['flops'], 'FLOPs')}")
                write_json(state_path, {"passes": passes}, indent=1, every_rank=True)
            fresh, cached = ev.fresh, ev.cached
        best = max(range(len(passes)), key=lambda i: (passes[i]["accuracy"], -i))
        widths = {int(g): int(w) for g, w in passes[best]["widths"].items()}
        plan = ctx.land_widths(widths, importance_of(order), revive=True)
        ctx.log(f"submodular: best pass '{passes[best]['pass']}' ({F.calls} distinct "
                f"evaluations, {fresh} run now, {cached} from the cache); landed at "
                f"{human(plan.achieved['flops'], 'FLOPs')}")
        info = {"passes": passes, "best_pass": passes[best]["pass"], "evaluations": F.calls,
                "evaluations_run": fresh, "evaluations_cached": cached,
                "candidate_steps": settings.steps, "increments": K,
                "candidate_val_samples": settings.val_samples}
        return Proposal(plan, base_state, info)


    def _backward(self, ctx: SearchContext, s: dict, K: int, order, meter) -> Proposal:
        """From the full model, remove the increment that loses the least F per unit of the
        binding target's metric it saves (`lazy_backward`), until the target holds."""
        graph = ctx.graph
        groups = graph.prunable_groups
        inc = {g.id: max(1, math.ceil(g.size / K)) for g in groups}
        steps_of = {g.id: math.ceil(g.size / inc[g.id]) for g in groups}
        # ties (F flat) go to the earlier element: the highest increments first, round robin
        # over the groups, so a flat F shrinks every group alike (about uniform's widths)
        elements = sorted(((g.id, k) for g in groups
                           for k in range(1 if g.removable else 2, steps_of[g.id] + 1)),
                          key=lambda e: (-e[1], e[0]))
        start = frozenset((g.id, k) for g in groups for k in range(1, steps_of[g.id] + 1))
        sets = Sets(graph, order, inc, meter)
        counts, widths_of, keep_of = sets.counts, sets.widths_of, sets.keep_of
        measure, fits = sets.measure, sets.fits

        def removable(e, S: frozenset) -> bool:
            gid, k = e
            return counts(S)[gid] == k and measure(S - {e}) is not None

        metric = binding_metric(ctx)

        def saving(e, S: frozenset) -> float:
            a, b = measure(S), measure(S - {e})
            return max(a[metric] - b[metric], 1e-9) if a and b else 1e-9

        settings, state_path, base_state = self._setup(ctx, s, 0, 0)
        with make_evaluator(ctx, settings, self.name) as ev:
            F = Counted(self._scorer(ctx, ev, keep_of, base_state))
            ctx.log(f"submodular (backward): {len(elements)} elements over {len(groups)} "
                    f"groups, removed by F lost per {metric} saved; {settings.steps} "
                    f"fine-tune steps per candidate, {ev.backend}")
            removed = lazy_backward(elements, F, start, removable, fits, saving,
                                    batch=ev.parallelism,
                                    max_evaluations=None if s["max_evaluations"] is None
                                    else int(s["max_evaluations"]))
            S = start - frozenset(removed)
            if not fits(S):
                raise UserError("submodular: removing every increment the graph allows does "
                                "not meet the target; relax the target or raise increments")
            value = F(S)
            fresh, cached = ev.fresh, ev.cached
        passes = [{"pass": f"backward loss/{metric}", "removed": [list(e) for e in removed],
                   "accuracy": value, "widths": {str(g): w for g, w in widths_of(S).items()},
                   **(measure(S) or {}), "evaluations_so_far": F.calls}]
        write_json(state_path, {"passes": passes}, indent=1, every_rank=True)
        plan = ctx.land_widths(widths_of(S), importance_of(order))
        ctx.log(f"submodular (backward): {len(removed)} increments removed, F = "
                f"{100 * value:.2f}% ({F.calls} distinct evaluations, {fresh} run now, "
                f"{cached} from the cache); landed at {human(plan.achieved['flops'], 'FLOPs')}")
        info = {"passes": passes, "best_pass": passes[0]["pass"], "direction": "backward",
                "evaluations": F.calls, "evaluations_run": fresh, "evaluations_cached": cached,
                "candidate_steps": settings.steps, "increments": K,
                "candidate_val_samples": settings.val_samples}
        return Proposal(plan, base_state, info)

    @staticmethod
    def _setup(ctx: SearchContext, s: dict, default_steps: int, default_val_samples: int):
        """The candidate settings (`candidate_steps`, else `default_steps`; the validation
        samples, else `default_val_samples`), the path of the passes' record and the
        baseline's weights the candidates start from."""
        if s.get("candidate_val_samples") is None:
            s = {**s, "candidate_val_samples": int(default_val_samples)}
        settings = EvalSettings(
            steps=int(s["candidate_steps"]) if s["candidate_steps"] is not None
            else int(default_steps),
            lr=ctx.lr, batch_size=ctx.batch_size, optimizer=str(s["optimizer"]), seed=ctx.seed,
            **candidate_scoring(s))
        base_state = {k: v.detach().clone() for k, v in ctx.model.state_dict().items()}
        return settings, Path(ctx.state_dir) / "submodular.json", base_state

    @staticmethod
    def _scorer(ctx: SearchContext, ev, keep_of, state):
        """F for `Counted`: the evaluator's scores of the sets' plans (candidates recorded)."""
        def batch(sets: list[frozenset]) -> list[float]:
            res = ev.evaluate([keep_of(S) for S in sets], state,
                              labels=[_label(S) for S in sets])
            for r in res:
                if not r.cached:
                    ctx.candidates.append({"flops": r.flops, "params": r.params,
                                           "accuracy": r.accuracy,
                                           "label": f"submodular {r.label}"})
            # a plan the slicer refuses (NaN) is never worth adding
            return [r.accuracy if math.isfinite(r.accuracy) else -1.0 for r in res]
        return batch


def _marginal(measure, S: frozenset, e, metric: str) -> float:
    a, b = measure(S), measure(S | {e})
    if a is None or b is None:
        return math.inf
    return max(b[metric] - a[metric], 1e-9)


def _label(S: frozenset) -> str:
    return "+".join(f"{g}.{k}" for g, k in sorted(S) if k > 1 or True)[:80]


__all__ = ["Submodular", "lazy_greedy", "plain_greedy", "lazy_backward", "plain_backward",
           "Counted"]
