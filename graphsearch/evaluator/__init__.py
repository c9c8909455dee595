"""The candidate evaluator: a batch of keep plans in, validation scores and costs out.

Search methods that spend their budget scoring candidate architectures (gensynth,
autoshrink, submodular, esnac) hand a batch of keep plans to one `CandidateEvaluator`,
together with the full-architecture weights every candidate inherits. For each plan the
evaluator slices those weights (`passes.slim`), trains the slim model briefly (a fixed
number of optimizer steps, cross-entropy or logit distillation from a teacher), and scores
it on the validation split (never the test split). Costs come from the graph's cost model.

The package, by concern:
- `candidate`: what one evaluation is (`EvalSettings`, `EvalResult`, its key and training
  seed, `run_candidate`, the same code wherever it runs);
- `probes`: what is measured on a trained candidate besides its score (`GateResponses`);
- `cache`: finished evaluations in the state folder (`EvalCache`);
- `backends`: where evaluations run (`InProcess`, `LocalWorkers`, `RayCluster`);
- this module: `CandidateEvaluator`, which keys a batch, reads what the cache has, slices
  the rest and hands them to its backend.

- Deterministic: a candidate's training seed is derived from its plan and the evaluation
  settings (not from the worker that runs it), and every evaluation runs on one torch thread,
  so the same plans give the same scores in-process, with any number of local workers, or
  on a Ray cluster.
- Cached: every finished evaluation is written atomically to `CACHE/<key>.json`, the key a
  hash of the plan, the evaluation settings and the inherited weights. A search restarted with
  the same state folder (`--resume`, even after `kill -9` in the middle of a batch) reads the
  finished ones back and runs only the rest.
- Backends: in-process (`workers=1`); local worker processes (`workers=N`, spawn context,
  each with `torch.set_num_threads(1)`; the data is sent once per worker, the slim modules
  per task); Ray (`ray="auto"` or an address; `pip install 'graphsearch[ray]'`): tasks carry
  the slim module and the settings, the data travels once through the object store, and a
  task whose worker dies is retried (`max_retries`).
- Beyond the score (gensynth uses both): `evaluate(..., return_state=True)` also gives back
  each candidate's trained slim weights (`EvalResult.state`; `passes.slim.unslim_state` maps
  them back to the full architecture), and `probe=` a picklable probe (`Probe`, e.g.
  `GateResponses`) that runs on the trained candidate in the worker (`EvalResult.probe`).
  Both are cached next to the scores (`CACHE/<key>.pt`); the probe's digest is part of the
  key (it changes a result), the request for the weights is not (it changes none: a cached
  entry without its weights is simply run again). `data_tag` names a training split other
  than the run's (gensynth trains on the split minus its probe images) in the key.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Mapping, Sequence

import torch
from torch import nn

from ..graph import ChannelGraph, PlanError
from ..load import UserError
from .backends import (Backend, Batch, InProcess, LocalWorkers, RayCluster, Task,
                       default_workers)
from .cache import STATS_FILE, EvalCache
from .candidate import (EvalResult, EvalSettings, canonical_keep, dumps, plan_key, plan_seed,
                        run_candidate, teacher_module, unpack_result, validation_indices,
                        validation_part, weights_digest)
from .probes import GateResponses, Probe


@dataclass
class CandidateEvaluator:
    """Scores batches of keep plans; see the module docstring.

    graph: the model's channel graph (slicing and costs); data: the run's DataBundle (its
    `train` split trains candidates, its `val` split scores them); cache_dir: where finished
    evaluations are kept (None: no cache); workers: 1 = in-process, N > 1 = N local worker
    processes, None = one per core; ray: None, "auto" or a cluster address (overrides
    workers); on_result: called with each result as it arrives (tests interrupt a batch
    here); data_tag: names the training split when it is not the run's (goes into the
    key)."""

    graph: ChannelGraph
    data: object
    settings: EvalSettings
    cache_dir: Path | None = None
    workers: int | None = 1
    ray: str | None = None
    log: Callable[[str], None] = print
    on_result: Callable[[EvalResult], None] | None = None
    max_retries: int = 3
    data_tag: str = ""
    fresh: int = 0  # evaluations run (not read from the cache) by this evaluator
    cached: int = 0  # evaluations read back from the cache
    runs_on: Backend = field(default=None, init=False, repr=False)  # where evaluations run
    cache: EvalCache = field(default=None, init=False, repr=False)

    def __post_init__(self):
        if self.workers is None:
            self.workers = default_workers()
        if int(self.workers) < 1:
            raise UserError(f"--workers {self.workers}: give at least 1")
        self.workers = int(self.workers)
        self.cache = EvalCache(self.cache_dir)
        self.cache_dir = self.cache.folder
        if self.ray:
            self.runs_on = RayCluster(self.data, self.ray, self.log, self.max_retries,
                                      on_retry=self._save_stats)
        elif self.workers > 1:
            self.runs_on = LocalWorkers(self.data, self.workers, self.log, self.max_retries)
        else:
            self.runs_on = InProcess(self.data)

    @property
    def parallelism(self) -> int:
        """How many evaluations run at once (batches this wide keep every worker busy)."""
        return self.runs_on.parallelism

    @property
    def backend(self) -> str:
        return self.runs_on.name

    @property
    def retried(self) -> int:
        """Evaluations run again because their worker process or Ray node died."""
        return self.runs_on.retried

    # ---- public
    def cost(self, keep: Mapping) -> dict[str, float]:
        c = self.graph.cost(canonical_keep(keep))
        return {"flops": float(c.flops), "macs": float(c.macs), "params": float(c.params)}

    def evaluate(self, keeps: Sequence[Mapping], state_dict: Mapping[str, torch.Tensor],
                 teacher_state: Mapping[str, torch.Tensor] | None = None,
                 labels: Sequence[str] | None = None, *, return_state: bool = False,
                 probe: Probe | None = None) -> list[EvalResult]:
        """Scores of `keeps` (each a plan: group id -> kept indices, changed groups only),
        every candidate inheriting `state_dict` (full-architecture weights) sliced to its
        plan; `teacher_state`: the teacher's weights when the settings distill. Results come
        back in the order of `keeps`; duplicates are evaluated once. `return_state`: each
        result also carries the trained slim model's state dict (`state`); `probe`: a `Probe`
        run on each trained candidate (its result in `probe`)."""
        if self.settings.distill and teacher_state is None:
            raise ValueError("distillation settings need teacher_state")
        keeps = [canonical_keep(k) for k in keeps]
        labels = list(labels) if labels is not None else [""] * len(keeps)
        wid = weights_digest(state_dict)
        if self.settings.distill:
            wid = wid + ":" + weights_digest(teacher_state)
        extra = {}
        if probe is not None:
            extra["probe"] = probe.digest()
        if self.data_tag:
            extra["data"] = self.data_tag
        keys = [plan_key(k, self.settings, wid, extra) for k in keeps]
        results: dict[str, EvalResult] = {}
        todo: list[int] = []
        for i, key in enumerate(keys):
            if key in results or any(keys[j] == key for j in todo):
                continue
            hit = self.cache.read(key, state=bool(return_state), probe=probe is not None)
            if hit is not None:
                results[key] = hit
                self.cached += 1
            else:
                todo.append(i)
        if todo:
            teacher = None
            if self.settings.distill:
                teacher = dumps(teacher_module(self.graph, teacher_state))
            batch = Batch(self.settings, teacher, bool(return_state))
            batch_of = _BatchState(keeps, keys, labels, results)
            self.runs_on.run(self._tasks(todo, batch_of, state_dict, probe), batch,
                             lambda t, out: self._finish(batch_of, t.index, unpack_result(out)))
        self._save_stats()
        return [dataclasses.replace(results[key], label=labels[i]) for i, key in enumerate(keys)]

    def discard_states(self, results: Sequence[EvalResult]) -> None:
        """Drop the cached trained weights of `results` (their scores and probe results stay
        cached): a search that no longer needs them keeps its state folder small. A later
        request for them runs the evaluation again."""
        self.cache.discard_states(r.key for r in results)

    def close(self) -> None:
        """Let the workers finish and end them (a search done)."""
        self.runs_on.close()

    def terminate(self) -> None:
        """End the workers now, evaluations in flight abandoned (an interrupted search:
        those are not cached and run again on --resume)."""
        self.runs_on.terminate()

    def __enter__(self):
        return self

    def __exit__(self, exc_type, *exc):
        if exc_type is None:
            self.close()
        else:
            self.terminate()

    # ---- internals
    def _tasks(self, todo, b: "_BatchState", state_dict, probe) -> Iterator[Task]:
        """The tasks of plans `todo`, sliced one at a time as the backend takes them (a plan
        that cannot be sliced or probed is recorded as failed here and yields no task)."""
        for i in todo:
            name = b.labels[i] or b.keys[i]
            try:
                bound = None if probe is None else probe.bind(self.graph, b.keeps[i])
            except PlanError as exc:
                self._fail(b, i, "probed", exc)
                continue
            try:
                module = self._slim(b.keeps[i], state_dict)
            except PlanError as exc:
                self._fail(b, i, "sliced", exc)
                continue
            yield Task(i, name, module, plan_seed(b.keeps[i], self.settings), bound)

    def _slim(self, keep, state_dict) -> nn.Module:
        from graphsearch.passes.slim import slim

        try:
            return slim(self.graph, keep, dict(state_dict))
        except PlanError:
            raise
        except Exception as exc:  # noqa: BLE001
            raise PlanError(f"cannot slice the plan: {exc}") from exc

    def _fail(self, b: "_BatchState", i: int, what: str, exc: Exception) -> None:
        """Record plan i as failed (scored NaN, the reason kept), and say so: a plan the cost
        model accepts but the slicer cannot realise never crashes a search."""
        self.log(f"evaluator: plan {b.labels[i] or b.keys[i]} cannot be {what} ({exc}); "
                 "scored NaN")
        self._finish(b, i, {"accuracy": float("nan"), "seconds": 0.0, "error": str(exc)[:500]})

    def _finish(self, b: "_BatchState", i: int, out: dict) -> None:
        cost = self.cost(b.keeps[i])
        r = EvalResult(b.keys[i], b.keeps[i], out["accuracy"], cost["flops"], cost["macs"],
                       cost["params"], out["seconds"], False, b.labels[i], out.get("error", ""),
                       out.get("state"), out.get("probe"))
        self.cache.write(r, {k: out[k] for k in ("state", "probe") if k in out})
        b.results[b.keys[i]] = r
        self.fresh += 1
        if self.on_result is not None:
            self.on_result(r)

    def _save_stats(self) -> None:
        """This process's counts (run, read back from the cache, retried) next to the cache,
        for the report: what a resumed or disturbed search really spent."""
        self.cache.write_stats({"fresh": self.fresh, "cached": self.cached,
                                "retried": self.retried, "backend": self.backend})


@dataclass
class _BatchState:
    """One `evaluate` call's plans, their keys and labels, and the results so far."""

    keeps: list
    keys: list
    labels: list
    results: dict


__all__ = ["CandidateEvaluator", "EvalSettings", "EvalResult", "EvalCache", "STATS_FILE",
           "plan_key", "plan_seed", "canonical_keep", "weights_digest", "run_candidate",
           "validation_part", "validation_indices", "default_workers", "Probe", "GateResponses",
           "Backend", "InProcess", "LocalWorkers", "RayCluster"]
