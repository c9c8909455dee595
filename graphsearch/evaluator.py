"""The candidate evaluator: a batch of keep plans in, validation scores and costs out.

Search methods that spend their budget scoring candidate architectures (autoshrink,
submodular, esnac) hand a batch of keep plans to one `CandidateEvaluator`, together with the
full-architecture weights every candidate inherits. For each plan the evaluator slices those
weights (`passes.slim`), trains the slim model briefly (a fixed number of optimizer steps,
cross-entropy or logit distillation from a teacher), and scores it on the validation split
(never the test split). Costs come from the graph's cost model.

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
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import time
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Callable, Mapping, Sequence

import numpy as np
import torch
from torch import nn

from .graph import ChannelGraph, PlanError
from .load import UserError

CACHE_VERSION = 1


@dataclass(frozen=True)
class EvalSettings:
    """How one candidate is trained and scored."""

    steps: int  # optimizer steps of the short fine-tune (0: score the sliced weights as they are)
    lr: float
    batch_size: int
    optimizer: str = "sgd"  # "sgd" (momentum, weight decay, cosine) or "adam"
    weight_decay: float = 5e-4
    momentum: float = 0.9
    distill: bool = False  # logit-MSE distillation from the teacher instead of cross-entropy
    seed: int = 0

    def __post_init__(self):
        if self.steps < 0:
            raise UserError(f"candidate training steps must be non-negative, got {self.steps}")
        if self.optimizer not in ("sgd", "adam"):
            raise UserError(f"candidate optimizer {self.optimizer!r}: choose 'sgd' or 'adam'")


@dataclass
class EvalResult:
    key: str
    keep: dict  # group id -> kept indices (changed groups only)
    accuracy: float  # top-1 on the validation split, in [0, 1]
    flops: float
    macs: float
    params: float
    seconds: float  # training + scoring time of the evaluation (when it ran)
    cached: bool = False  # read back from the cache, not run now
    label: str = ""
    error: str = ""  # the plan could not be sliced (accuracy is NaN): methods skip it


# --------------------------------------------------------------------------- helpers


def canonical_keep(keep: Mapping) -> dict[int, list[int]]:
    """A plan in one canonical form: int group ids, sorted kept indices."""
    return {int(g): sorted(int(i) for i in v) for g, v in sorted(keep.items(),
                                                                  key=lambda kv: int(kv[0]))}


def weights_digest(state_dict: Mapping[str, torch.Tensor]) -> str:
    """A content hash of a state dict (names, shapes, dtypes, values)."""
    h = hashlib.sha256()
    for name in sorted(state_dict):
        t = state_dict[name]
        if not isinstance(t, torch.Tensor):
            continue
        t = t.detach().cpu().contiguous()
        h.update(name.encode())
        h.update(str((tuple(t.shape), str(t.dtype))).encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def plan_key(keep: Mapping, settings: EvalSettings, weights: str) -> str:
    blob = json.dumps({"v": CACHE_VERSION, "keep": {str(g): v for g, v in
                                                     canonical_keep(keep).items()},
                       "settings": asdict(settings), "weights": weights}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:32]


def plan_seed(keep: Mapping, settings: EvalSettings) -> int:
    """The training seed of a candidate: from its plan and the settings' seed only."""
    blob = json.dumps({"keep": {str(g): v for g, v in canonical_keep(keep).items()},
                       "seed": int(settings.seed)}, sort_keys=True)
    return int(hashlib.sha256(blob.encode()).hexdigest()[:8], 16) % (2 ** 31 - 1)


def _dumps(obj) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def _loads(blob: bytes):
    return torch.load(io.BytesIO(blob), weights_only=False)


def _write_json_atomic(path: Path, obj) -> None:
    """The project's one atomic writer; on every process (workers are not torchrun ranks)."""
    from .checkpoint import write_atomic

    write_atomic(path, json.dumps(obj), every_rank=True)


# --------------------------------------------------------------------------- one evaluation


class _Distill(nn.Module):
    """Student and frozen teacher side by side: forward returns (student, teacher) logits, so
    the training loop counts the student's accuracy and the loss compares the two."""

    def __init__(self, student: nn.Module, teacher: nn.Module):
        super().__init__()
        self.student = student
        self.teacher = teacher.eval()
        for p in self.teacher.parameters():
            p.requires_grad_(False)

    def train(self, mode: bool = True):
        self.training = mode
        self.student.train(mode)
        self.teacher.eval()
        return self

    def forward(self, x):
        s = self.student(x)
        s = s[0] if isinstance(s, (tuple, list)) else s
        with torch.no_grad():
            t = self.teacher(x)
            t = t[0] if isinstance(t, (tuple, list)) else t
        return s, t


def _distill_loss(out, y):
    return nn.functional.mse_loss(out[0], out[1])


def run_candidate(module: nn.Module, data, settings: EvalSettings, seed: int,
                  teacher: nn.Module | None = None) -> dict:
    """Train `module` (a slim model) for `settings.steps` steps with training seed `seed` and
    return its validation top-1. Runs on one torch thread (restored afterwards)."""
    from .train import evaluate, train

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    t0 = time.time()
    try:
        if settings.steps > 0:
            per_epoch = max(1, -(-len(data.train) // settings.batch_size))
            epochs = max(1, -(-settings.steps // per_epoch))
            net, loss_fn = module, None
            if settings.distill:
                if teacher is None:
                    raise ValueError("distillation needs a teacher")
                net, loss_fn = _Distill(module, teacher), _distill_loss
            if settings.optimizer == "adam":
                def optimizer(m, lr=settings.lr, wd=settings.weight_decay):
                    return torch.optim.Adam([p for p in module.parameters() if p.requires_grad],
                                            lr=lr, weight_decay=wd)
                scheduler = (lambda opt, total: torch.optim.lr_scheduler.LambdaLR(
                    opt, lambda s: 1.0))
            else:
                def optimizer(m, s=settings):
                    return torch.optim.SGD([p for p in module.parameters() if p.requires_grad],
                                           lr=s.lr, momentum=s.momentum,
                                           weight_decay=s.weight_decay)
                scheduler = None
            train(net, SimpleNamespace(train=data.train, val=None), epochs=epochs,
                  lr=settings.lr, batch_size=settings.batch_size, seed=seed, progress=False,
                  checkpoint=None, desc="candidate", loss_fn=loss_fn, max_steps=settings.steps,
                  optimizer=optimizer, scheduler=scheduler, evaluate_every_epoch=False,
                  device="cpu")
        acc = evaluate(module, data.val, distributed=False, device="cpu")
    finally:
        torch.set_num_threads(threads)
    return {"accuracy": float(acc), "seconds": time.time() - t0}


# ---- worker-process side (local backend)

_WORKER_DATA = None


def _init_worker(data) -> None:
    global _WORKER_DATA
    torch.set_num_threads(1)
    _WORKER_DATA = data


def _worker_task(module_blob: bytes, teacher_blob: bytes | None, settings: dict, seed: int) -> dict:
    _maybe_crash_for_a_test()
    teacher = _loads(teacher_blob) if teacher_blob is not None else None
    return run_candidate(_loads(module_blob), _WORKER_DATA, EvalSettings(**settings), seed,
                         teacher)


def _ray_task(data, module_blob: bytes, teacher_blob: bytes | None, settings: dict,
              seed: int) -> dict:
    _maybe_crash_for_a_test()
    torch.set_num_threads(1)
    teacher = _loads(teacher_blob) if teacher_blob is not None else None
    return run_candidate(_loads(module_blob), data, EvalSettings(**settings), seed, teacher)


def _maybe_crash_for_a_test() -> None:
    """Tests of worker loss: when GRAPHSEARCH_TEST_CRASH_DIR names a folder holding a file
    `crash-once`, the first task to claim it kills its own worker process."""
    folder = os.environ.get("GRAPHSEARCH_TEST_CRASH_DIR")
    if not folder:
        return
    flag = Path(folder) / "crash-once"
    try:
        os.rename(flag, Path(folder) / f"crashed-{os.getpid()}")
    except OSError:
        return
    os._exit(1)


def import_ray():
    try:
        import ray  # noqa: F401
    except ImportError as exc:
        raise UserError("--ray needs Ray, an optional extra: pip install 'graphsearch[ray]' "
                        "(or run without --ray to evaluate on local worker processes)") from exc
    return ray


def default_workers() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


# --------------------------------------------------------------------------- the evaluator


@dataclass
class CandidateEvaluator:
    """Scores batches of keep plans; see the module docstring.

    graph: the model's channel graph (slicing and costs); data: the run's DataBundle (its
    `train` split trains candidates, its `val` split scores them); cache_dir: where finished
    evaluations are kept (None: no cache); workers: 1 = in-process, N > 1 = N local worker
    processes, None = one per core; ray: None, "auto" or a cluster address (overrides
    workers); on_result: called with each result as it arrives (tests interrupt a batch
    here)."""

    graph: ChannelGraph
    data: object
    settings: EvalSettings
    cache_dir: Path | None = None
    workers: int | None = 1
    ray: str | None = None
    log: Callable[[str], None] = print
    on_result: Callable[[EvalResult], None] | None = None
    max_retries: int = 3
    fresh: int = 0  # evaluations run (not read from the cache) by this evaluator
    cached: int = 0  # evaluations read back from the cache
    _pool: object = field(default=None, repr=False)
    _ray_fn: object = field(default=None, repr=False)
    _ray_data: object = field(default=None, repr=False)

    def __post_init__(self):
        if self.workers is None:
            self.workers = default_workers()
        if int(self.workers) < 1:
            raise UserError(f"--workers {self.workers}: give at least 1")
        self.workers = int(self.workers)
        if self.cache_dir is not None:
            self.cache_dir = Path(self.cache_dir)
            self.cache_dir.mkdir(parents=True, exist_ok=True)
        if self.ray:
            ray = import_ray()
            if not ray.is_initialized():
                try:
                    ray.init(address=self.ray, log_to_driver=False)
                except Exception as exc:  # noqa: BLE001
                    raise UserError(f"--ray {self.ray}: cannot connect to a Ray cluster ({exc}); "
                                    "start one with `ray start --head` or give its address "
                                    "(HOST:6379)") from exc

    @property
    def parallelism(self) -> int:
        """How many evaluations run at once (batches this wide keep every worker busy)."""
        if self.ray:
            ray = import_ray()
            return max(1, int(ray.cluster_resources().get("CPU", 1)))
        return self.workers

    @property
    def backend(self) -> str:
        if self.ray:
            return f"ray({self.ray})"
        return "in-process" if self.workers == 1 else f"{self.workers} local workers"

    # ---- public
    def cost(self, keep: Mapping) -> dict[str, float]:
        c = self.graph.cost(canonical_keep(keep))
        return {"flops": float(c.flops), "macs": float(c.macs), "params": float(c.params)}

    def evaluate(self, keeps: Sequence[Mapping], state_dict: Mapping[str, torch.Tensor],
                 teacher_state: Mapping[str, torch.Tensor] | None = None,
                 labels: Sequence[str] | None = None) -> list[EvalResult]:
        """Scores of `keeps` (each a plan: group id -> kept indices, changed groups only),
        every candidate inheriting `state_dict` (full-architecture weights) sliced to its
        plan; `teacher_state`: the teacher's weights when the settings distill. Results come
        back in the order of `keeps`; duplicates are evaluated once."""
        if self.settings.distill and teacher_state is None:
            raise ValueError("distillation settings need teacher_state")
        keeps = [canonical_keep(k) for k in keeps]
        labels = list(labels) if labels is not None else [""] * len(keeps)
        wid = weights_digest(state_dict)
        if self.settings.distill:
            wid = wid + ":" + weights_digest(teacher_state)
        keys = [plan_key(k, self.settings, wid) for k in keeps]
        results: dict[str, EvalResult] = {}
        todo: list[int] = []
        for i, (k, key) in enumerate(zip(keeps, keys)):
            if key in results or any(keys[j] == key for j in todo):
                continue
            hit = self._read(key)
            if hit is not None:
                hit.label = labels[i]
                results[key] = hit
                self.cached += 1
            else:
                todo.append(i)
        if todo:
            teacher_blob = None
            if self.settings.distill:
                teacher = _teacher(self.graph, teacher_state)
                teacher_blob = _dumps(teacher)
            self._run(todo, keeps, keys, labels, state_dict, teacher_blob, results)
        return [self._relabel(results[key], labels[i]) for i, key in enumerate(keys)]

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # ---- internals
    @staticmethod
    def _relabel(r: EvalResult, label: str) -> EvalResult:
        return EvalResult(**{**asdict(r), "label": label})

    def _path(self, key: str) -> Path | None:
        return None if self.cache_dir is None else self.cache_dir / f"{key}.json"

    def _read(self, key: str) -> EvalResult | None:
        path = self._path(key)
        if path is None or not path.exists():
            return None
        try:
            d = json.loads(path.read_text())
            d["keep"] = {int(g): v for g, v in d["keep"].items()}
            return EvalResult(**{**d, "cached": True})
        except (ValueError, KeyError, TypeError):
            return None  # a damaged entry is simply evaluated again

    def _finish(self, i, keeps, keys, labels, out: dict, results) -> None:
        cost = self.cost(keeps[i])
        r = EvalResult(keys[i], keeps[i], out["accuracy"], cost["flops"], cost["macs"],
                       cost["params"], out["seconds"], False, labels[i], out.get("error", ""))
        path = self._path(keys[i])
        if path is not None:
            d = asdict(r)
            d["keep"] = {str(g): v for g, v in r.keep.items()}
            d.pop("cached")
            _write_json_atomic(path, d)
        results[keys[i]] = r
        self.fresh += 1
        if self.on_result is not None:
            self.on_result(r)

    def _slim(self, keep, state_dict) -> nn.Module:
        from graphsearch.passes.slim import slim

        try:
            return slim(self.graph, keep, dict(state_dict))
        except PlanError:
            raise
        except Exception as exc:  # noqa: BLE001
            raise PlanError(f"cannot slice the plan: {exc}") from exc

    def _slim_or_fail(self, i, keeps, keys, labels, state_dict, results):
        """The slim module of plan i, or None after recording the plan as failed (a plan the
        cost model accepts but the slicer cannot realise scores NaN, never crashes a search)."""
        try:
            return self._slim(keeps[i], state_dict)
        except PlanError as exc:
            self.log(f"evaluator: plan {labels[i] or keys[i]} cannot be sliced ({exc}); "
                     "scored NaN")
            self._finish(i, keeps, keys, labels, {"accuracy": float("nan"), "seconds": 0.0,
                                                  "error": str(exc)[:500]}, results)
            return None

    def _run(self, todo, keeps, keys, labels, state_dict, teacher_blob, results) -> None:
        settings = asdict(self.settings)
        seeds = {i: plan_seed(keeps[i], self.settings) for i in todo}
        if self.ray:
            return self._run_ray(todo, keeps, keys, labels, state_dict, teacher_blob,
                                 settings, seeds, results)
        if self.workers == 1:
            teacher = _loads(teacher_blob) if teacher_blob is not None else None
            for i in todo:
                module = self._slim_or_fail(i, keeps, keys, labels, state_dict, results)
                if module is not None:
                    out = run_candidate(module, self.data, self.settings, seeds[i], teacher)
                    self._finish(i, keeps, keys, labels, out, results)
            return
        pending = list(todo)
        for attempt in range(self.max_retries + 1):
            try:
                pool = self._local_pool()
                futures = {}
                for i in list(pending):
                    module = self._slim_or_fail(i, keeps, keys, labels, state_dict, results)
                    if module is None:
                        pending.remove(i)
                        continue
                    futures[pool.submit(_worker_task, _dumps(module), teacher_blob, settings,
                                        seeds[i])] = i
                while futures:
                    done, _ = wait(list(futures), return_when=FIRST_COMPLETED)
                    for f in sorted(done, key=lambda f: futures[f]):
                        i = futures.pop(f)
                        self._finish(i, keeps, keys, labels, f.result(), results)
                        pending.remove(i)
                return
            except BrokenProcessPool:
                # a worker died (killed, out of memory): start a fresh pool, rerun the rest
                self.log(f"evaluator: a worker process was lost; retrying {len(pending)} "
                         f"evaluation(s) (attempt {attempt + 1} of {self.max_retries})")
                if self._pool is not None:
                    self._pool.shutdown(wait=False, cancel_futures=True)
                self._pool = None
            except BaseException:
                if self._pool is not None:
                    for f in list(futures):
                        f.cancel()
                raise
        raise RuntimeError(f"evaluator: worker processes kept dying; {len(pending)} "
                           "evaluation(s) not done")

    def _local_pool(self):
        if self._pool is None:
            ctx = torch.multiprocessing.get_context("spawn")
            self._pool = ProcessPoolExecutor(max_workers=self.workers, mp_context=ctx,
                                             initializer=_init_worker, initargs=(self.data,))
        return self._pool

    def _run_ray(self, todo, keeps, keys, labels, state_dict, teacher_blob, settings, seeds,
                 results) -> None:
        ray = import_ray()
        if self._ray_fn is None:
            self._ray_fn = ray.remote(num_cpus=1, max_retries=self.max_retries)(_ray_task)
            self._ray_data = ray.put(self.data)
        refs = {}
        for i in todo:
            module = self._slim_or_fail(i, keeps, keys, labels, state_dict, results)
            if module is not None:
                refs[self._ray_fn.remote(self._ray_data, _dumps(module), teacher_blob,
                                         settings, seeds[i])] = i
        try:
            while refs:
                done, _ = ray.wait(list(refs), num_returns=1)
                for ref in done:
                    i = refs.pop(ref)
                    self._finish(i, keeps, keys, labels, ray.get(ref), results)
        except BaseException:
            for ref in refs:
                ray.cancel(ref, force=True)
            raise


def _teacher(graph: ChannelGraph, teacher_state) -> nn.Module:
    import copy

    t = copy.deepcopy(graph.module)
    t.load_state_dict(dict(teacher_state))
    return t.eval()


def steps_for(ctx, evaluations: float, at_least: int = 1) -> int:
    """Optimizer steps per candidate when the search budget `ctx.epochs` (epochs of the
    training split) is split over about `evaluations` candidate fine-tunes."""
    per_epoch = max(1, -(-len(ctx.data.train) // ctx.batch_size))
    return max(int(at_least), int(math.floor(ctx.epochs * per_epoch / max(evaluations, 1))))


def make_evaluator(ctx, settings: EvalSettings, name: str) -> CandidateEvaluator:
    """The evaluator of a search: the backend from the context (`ctx.workers`, `ctx.ray`),
    the cache in `ctx.state_dir / f"evals-{name}"`."""
    ev = CandidateEvaluator(ctx.graph, ctx.data, settings,
                            cache_dir=Path(ctx.state_dir) / f"evals-{name}",
                            workers=getattr(ctx, "workers", 1), ray=getattr(ctx, "ray", None),
                            log=ctx.log, on_result=getattr(ctx, "on_result", None))
    return ev


__all__ = ["CandidateEvaluator", "EvalSettings", "EvalResult", "make_evaluator", "steps_for",
           "plan_key", "plan_seed", "canonical_keep", "run_candidate", "default_workers"]


# --------------------------------------------------------------------------- shared by methods


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
