"""The candidate evaluator: a batch of keep plans in, validation scores and costs out.

Search methods that spend their budget scoring candidate architectures (gensynth,
autoshrink, submodular, esnac) hand a batch of keep plans to one `CandidateEvaluator`,
together with the full-architecture weights every candidate inherits. For each plan the
evaluator slices those weights (`passes.slim`), trains the slim model briefly (a fixed
number of optimizer steps, cross-entropy or logit distillation from a teacher), and scores
it on the validation split (never the test split). Costs come from the graph's cost model.

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
import hashlib
import io
import json
import math
import os
import signal
import sys
import threading
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

from .checkpoint import write_json
from .graph import ChannelGraph, PlanError
from .load import UserError
from .train import Distilled, evaluate, recalibrate_bn, steps_per_epoch, train

CACHE_VERSION = 1
STATS_FILE = "stats.json"  # an evaluator's counts, written next to its cache (not an entry)


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
    # adaptive BN: re-estimate the sliced model's BatchNorm statistics on this many training
    # images before it trains or is scored (0: keep the inherited ones)
    bn_images: int = 0
    # score on this many validation samples, a fixed draw (0: the whole validation split)
    val_samples: int = 0

    def __post_init__(self):
        if self.steps < 0:
            raise UserError(f"candidate training steps must be non-negative, got {self.steps}")
        if self.bn_images < 0 or self.val_samples < 0:
            raise UserError("candidate bn_images and val_samples must be non-negative")
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
    state: dict | None = None  # the trained slim model's state dict (`return_state=True`)
    probe: object = None  # what the evaluation's probe returned on the trained candidate

    def __repr__(self) -> str:  # without the tensors
        return (f"EvalResult(key={self.key!r}, label={self.label!r}, accuracy={self.accuracy}, "
                f"flops={self.flops}, cached={self.cached}, state={self.state is not None}, "
                f"probe={self.probe is not None}, error={self.error!r})")


_JSON_FIELDS = ("key", "keep", "accuracy", "flops", "macs", "params", "seconds", "label",
                "error")


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


def plan_key(keep: Mapping, settings: EvalSettings, weights: str,
             extra: Mapping[str, str] | None = None) -> str:
    """The cache key of an evaluation: the plan, the settings, the inherited weights' digest
    and `extra` (anything else that changes a result: a probe's digest, a data tag; absent
    from the key when empty, so plain evaluations keep their keys)."""
    obj = {"v": CACHE_VERSION, "keep": {str(g): v for g, v in canonical_keep(keep).items()},
           "settings": asdict(settings), "weights": weights}
    if extra:
        obj["extra"] = {str(k): str(v) for k, v in extra.items()}
    blob = json.dumps(obj, sort_keys=True)
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


def _save_atomic(path: Path, obj) -> None:
    """torch.save, atomically (a temporary file renamed into place)."""
    from .checkpoint import write_atomic

    write_atomic(path, _dumps(obj), every_rank=True)


# --------------------------------------------------------------------------- probes


class Probe:
    """Something measured on each trained candidate, in the worker that trained it.

    `digest()`: a string naming the probe and everything that changes what it returns (it
    goes into the cache key); `bind(graph, keep)`: called in the search's process for each
    candidate, returns a picklable callable `f(module) -> result` that the worker calls on the
    trained slim module (in eval mode; it must leave the weights as they are). The result must
    be picklable (it is cached with `torch.save`)."""

    def digest(self) -> str:
        raise NotImplementedError

    def bind(self, graph: ChannelGraph, keep: Mapping) -> Callable[[nn.Module], object]:
        raise NotImplementedError


class GateResponses(Probe):
    """Per prunable group, the mean over `stimuli` (a sequence of (images, labels) batches)
    of |dL/dgate_c|, L the cross-entropy summed over a stimulus and divided by its size, with
    a gate of ones on every channel at its gate sites (`ChannelGraph.gate_sites`): at a kept
    channel that is |sum(a_c * dL/da_c)|, the channel's response; 0 at a dropped channel.
    Returns {group id: float64 array of the group's full size}."""

    VERSION = 1

    def __init__(self, stimuli: Sequence, chunk: int = 256):
        self.stimuli = [(torch.as_tensor(x), torch.as_tensor(y).long()) for x, y in stimuli]
        self.chunk = int(chunk)

    def digest(self) -> str:
        h = hashlib.sha256(f"gate-responses:{self.VERSION}:{self.chunk}".encode())
        for x, y in self.stimuli:
            h.update(weights_digest({"x": x, "y": y}).encode())
        return h.hexdigest()[:32]

    def bind(self, graph: ChannelGraph, keep: Mapping) -> "_BoundGateResponses":
        from graphsearch.passes.plan import resolve

        plan = resolve(graph, canonical_keep(keep))
        infos = {i.name: i for i in graph.nodes}
        sizes = {g.id: g.size for g in graph.prunable_groups}
        points = {}
        for node, (groups, index) in graph.gate_sites().items():
            if node in plan.dead or not any(int(g) in sizes for g in np.unique(groups)):
                continue
            ids = infos[node].ids
            sel = plan.selection(ids, tuple(ids.shape))
            if sel is None:
                raise PlanError(f"gate site '{node}': the kept channels are no regular slice")
            for d, idx in enumerate(sel):
                if idx is not None:
                    groups, index = np.take(groups, idx, axis=d), np.take(index, idx, axis=d)
            points[node] = (torch.from_numpy(np.ascontiguousarray(groups)),
                            torch.from_numpy(np.ascontiguousarray(index)))
        return _BoundGateResponses(points, sizes, self.stimuli, self.chunk)


class _BoundGateResponses:
    """`GateResponses` for one candidate: the gate sites of its slim model."""

    def __init__(self, points, sizes, stimuli, chunk):
        self.points, self.sizes, self.stimuli, self.chunk = points, sizes, stimuli, chunk

    def __call__(self, module: nn.Module) -> dict[int, np.ndarray]:
        from graphsearch.passes.gates import GateInterpreter

        names = {n.name for n in module.graph.nodes}
        missing = sorted(set(self.points) - names)
        if missing:
            raise RuntimeError(f"gate responses: the slim model lost gate sites {missing}")
        gates = {gid: torch.ones(n, requires_grad=True) for gid, n in self.sizes.items()}
        acc = {gid: torch.zeros(n) for gid, n in self.sizes.items()}
        was = module.training
        module.eval()
        try:
            for x, y in self.stimuli:
                grads = {gid: torch.zeros(n) for gid, n in self.sizes.items()}
                for xb, yb in zip(x.split(self.chunk), y.split(self.chunk)):
                    out = GateInterpreter(module, self.points, gates).run(xb)
                    out = out[0] if isinstance(out, (tuple, list)) else out
                    loss = nn.functional.cross_entropy(out, yb, reduction="sum") / len(y)
                    got = torch.autograd.grad(loss, list(gates.values()), allow_unused=True)
                    for gid, g in zip(gates, got):
                        if g is not None:
                            grads[gid] += g.detach()
                for gid in gates:
                    acc[gid] += grads[gid].abs()
        finally:
            module.train(was)
        n = max(1, len(self.stimuli))
        return {gid: (a / n).double().numpy() for gid, a in acc.items()}


# --------------------------------------------------------------------------- one evaluation


def validation_part(val, samples: int):
    """`samples` of the validation split, the same ones for every candidate (a draw by a fixed
    seed), or the whole split when `samples` is 0 or not smaller than it."""
    if not samples or val is None or samples >= len(val):
        return val
    pick = torch.randperm(len(val), generator=torch.Generator().manual_seed(0))[:samples]
    pick = pick.sort().values
    if callable(getattr(val, "subset", None)):
        return val.subset(pick.tolist())
    return torch.utils.data.Subset(val, pick.tolist())


def _distill_loss(out, y):
    return nn.functional.mse_loss(out[0], out[1])


def run_candidate(module: nn.Module, data, settings: EvalSettings, seed: int,
                  teacher: nn.Module | None = None, return_state: bool = False,
                  probe: Callable[[nn.Module], object] | None = None) -> dict:
    """Train `module` (a slim model) for `settings.steps` steps with training seed `seed` and
    return its validation top-1 ("accuracy"), with `return_state` its trained state dict
    ("state"), with `probe` (a bound probe, see `Probe`) what the probe returns on the
    trained module ("probe"). Runs on one torch thread (restored afterwards)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    t0 = time.time()
    try:
        if settings.bn_images:
            recalibrate_bn(module, data.train, settings.bn_images, settings.batch_size, seed)
        if settings.steps > 0:
            per_epoch = max(1, steps_per_epoch(len(data.train), settings.batch_size, None))
            epochs = max(1, -(-settings.steps // per_epoch))
            net, loss_fn = module, None
            if settings.distill:
                if teacher is None:
                    raise ValueError("distillation needs a teacher")
                net, loss_fn = Distilled(module, teacher), _distill_loss
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
        acc = evaluate(module, validation_part(data.val, settings.val_samples),
                       distributed=False, device="cpu")
        out = {"accuracy": float(acc)}
        if return_state:
            out["state"] = {k: v.detach().clone() for k, v in module.state_dict().items()}
        if probe is not None:
            out["probe"] = probe(module)
    finally:
        torch.set_num_threads(threads)
    out["seconds"] = time.time() - t0
    return out


def _pack(out: dict) -> dict:
    """A worker's result for the trip back: the weights and the probe's result as one blob
    (tensors travel as bytes, not through shared memory)."""
    extras = {k: out.pop(k) for k in ("state", "probe") if k in out}
    if extras:
        out["extras"] = _dumps(extras)
    return out


def _unpack(out: dict) -> dict:
    if "extras" in out:
        out = {**out, **_loads(out["extras"])}
        out.pop("extras")
    return out


# ---- worker-process side (local backend)

_WORKER_DATA = None


def _init_worker(data, parent: int | None = None) -> None:
    global _WORKER_DATA
    if parent is not None:
        die_with_parent(parent)
    # Ctrl-C in a terminal reaches the whole process group: the driver handles it (and ends
    # its workers); a worker printing its own KeyboardInterrupt traceback would only add noise.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    torch.set_num_threads(1)
    _WORKER_DATA = data


PARENT_POLL_S = 0.5  # how often a worker's watchdog looks for its driver


def die_with_parent(parent: int) -> None:
    """End this process when process `parent` (the driver that started it) ends, however it
    ends (SIGTERM, SIGINT, kill -9): a worker never outlives its search.

    On Linux the kernel does it: `prctl(PR_SET_PDEATHSIG, SIGKILL)` asks for SIGKILL when the
    parent dies (strictly: when the parent's thread that started this process ends). A daemon
    thread also polls the parent pid every PARENT_POLL_S seconds and exits when this process
    has been handed to another parent (the portable fallback, and a second line on Linux).
    If the parent is gone already, exit now."""
    if sys.platform.startswith("linux"):
        try:
            import ctypes

            libc = ctypes.CDLL(None, use_errno=True)
            PR_SET_PDEATHSIG = 1
            libc.prctl(PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)
        except (OSError, AttributeError):  # no libc prctl here: the watchdog alone
            pass
    if os.getppid() != parent:  # died before the request above took effect
        os._exit(1)
    threading.Thread(target=_watch_parent, args=(parent,), name="graphsearch-watch-parent",
                     daemon=True).start()


def _watch_parent(parent: int) -> None:
    while True:
        time.sleep(PARENT_POLL_S)
        if os.getppid() != parent:
            os._exit(1)


def _worker_task(module_blob: bytes, teacher_blob: bytes | None, settings: dict, seed: int,
                 return_state: bool = False, probe_blob: bytes | None = None) -> dict:
    _maybe_crash_for_a_test()
    teacher = _loads(teacher_blob) if teacher_blob is not None else None
    probe = _loads(probe_blob) if probe_blob is not None else None
    return _pack(run_candidate(_loads(module_blob), _WORKER_DATA, EvalSettings(**settings),
                               seed, teacher, return_state, probe))


def _ray_task(data, module_blob: bytes, teacher_blob: bytes | None, settings: dict,
              seed: int, return_state: bool = False, probe_blob: bytes | None = None) -> dict:
    _maybe_crash_for_a_test()
    torch.set_num_threads(1)
    teacher = _loads(teacher_blob) if teacher_blob is not None else None
    probe = _loads(probe_blob) if probe_blob is not None else None
    return _pack(run_candidate(_loads(module_blob), data, EvalSettings(**settings), seed,
                               teacher, return_state, probe))


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
    retried: int = 0  # evaluations run again because their worker process or Ray node died
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
        want = SimpleNamespace(state=bool(return_state), probe=probe)
        results: dict[str, EvalResult] = {}
        todo: list[int] = []
        for i, (k, key) in enumerate(zip(keeps, keys)):
            if key in results or any(keys[j] == key for j in todo):
                continue
            hit = self._read(key, want)
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
            self._run(todo, keeps, keys, labels, state_dict, teacher_blob, results, want)
        self._save_stats()
        return [self._relabel(results[key], labels[i]) for i, key in enumerate(keys)]

    def discard_states(self, results: Sequence[EvalResult]) -> None:
        """Drop the cached trained weights of `results` (their scores and probe results stay
        cached): a search that no longer needs them keeps its state folder small. A later
        request for them runs the evaluation again."""
        for r in results:
            path = self._extras_path(r.key)
            if path is None or not path.exists():
                continue
            try:
                extras = torch.load(path, weights_only=False)
            except Exception:  # noqa: BLE001
                path.unlink(missing_ok=True)
                continue
            if isinstance(extras, dict) and "state" in extras:
                extras.pop("state")
                _save_atomic(path, extras)

    def close(self) -> None:
        """Let the workers finish and end them (a search done)."""
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None

    def terminate(self) -> None:
        """End the local workers now, evaluations in flight abandoned (an interrupted
        search: those are not cached and run again on --resume)."""
        pool, self._pool = self._pool, None
        if pool is None:
            return
        processes = list((getattr(pool, "_processes", None) or {}).values())
        for p in processes:
            if p.is_alive():
                p.kill()
        pool.shutdown(wait=False, cancel_futures=True)
        for p in processes:
            p.join(timeout=5)

    def __enter__(self):
        return self

    def __exit__(self, exc_type, *exc):
        if exc_type is None:
            self.close()
        else:
            self.terminate()

    # ---- internals
    @staticmethod
    def _relabel(r: EvalResult, label: str) -> EvalResult:
        return dataclasses.replace(r, label=label)

    def _path(self, key: str) -> Path | None:
        return None if self.cache_dir is None else self.cache_dir / f"{key}.json"

    def _extras_path(self, key: str) -> Path | None:
        return None if self.cache_dir is None else self.cache_dir / f"{key}.pt"

    def _read(self, key: str, want=None) -> EvalResult | None:
        path = self._path(key)
        if path is None or not path.exists():
            return None
        try:
            d = json.loads(path.read_text())
            d = {k: d[k] for k in _JSON_FIELDS if k in d}
            d["keep"] = {int(g): v for g, v in d["keep"].items()}
            r = EvalResult(**{**d, "cached": True})
        except (ValueError, KeyError, TypeError):
            return None  # a damaged entry is simply evaluated again
        need_state = bool(want is not None and want.state)
        need_probe = bool(want is not None and want.probe is not None)
        if (need_state or need_probe) and not r.error:
            extras_path = self._extras_path(key)
            try:
                extras = torch.load(extras_path, weights_only=False)
            except Exception:  # noqa: BLE001 (missing or damaged: evaluate again)
                return None
            if (need_state and "state" not in extras) or (need_probe and "probe" not in extras):
                return None
            r.state = extras.get("state") if need_state else None
            r.probe = extras.get("probe") if need_probe else None
        return r

    def _finish(self, i, keeps, keys, labels, out: dict, results) -> None:
        out = _unpack(out)
        cost = self.cost(keeps[i])
        r = EvalResult(keys[i], keeps[i], out["accuracy"], cost["flops"], cost["macs"],
                       cost["params"], out["seconds"], False, labels[i], out.get("error", ""),
                       out.get("state"), out.get("probe"))
        path = self._path(keys[i])
        if path is not None:
            extras = {k: out[k] for k in ("state", "probe") if k in out}
            if extras:  # first the weights and probe results, then the entry that names them
                _save_atomic(self._extras_path(keys[i]), extras)
            d = {k: getattr(r, k) for k in _JSON_FIELDS}
            d["keep"] = {str(g): v for g, v in r.keep.items()}
            write_json(path, d, every_rank=True)  # workers are not torchrun ranks
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
            self._fail(i, keeps, keys, labels, results, "sliced", exc)
            return None

    def _bind_or_fail(self, i, keeps, keys, labels, results, probe):
        """The probe bound to plan i (None without a probe); False after recording the plan
        as failed when the probe cannot be placed on its slim model."""
        if probe is None:
            return None
        try:
            return probe.bind(self.graph, keeps[i])
        except PlanError as exc:
            self._fail(i, keeps, keys, labels, results, "probed", exc)
            return False

    def _fail(self, i, keeps, keys, labels, results, what: str, exc: Exception) -> None:
        """Record plan i as failed (scored NaN, the reason kept), and say so."""
        self.log(f"evaluator: plan {labels[i] or keys[i]} cannot be {what} ({exc}); scored NaN")
        self._finish(i, keeps, keys, labels, {"accuracy": float("nan"), "seconds": 0.0,
                                              "error": str(exc)[:500]}, results)

    def _prepare(self, i, keeps, keys, labels, state_dict, results, want):
        """(slim module, bound probe) of plan i, or None when the plan failed."""
        bound = self._bind_or_fail(i, keeps, keys, labels, results, want.probe)
        if bound is False:
            return None
        module = self._slim_or_fail(i, keeps, keys, labels, state_dict, results)
        return None if module is None else (module, bound)

    def _run(self, todo, keeps, keys, labels, state_dict, teacher_blob, results,
             want=None) -> None:
        want = want or SimpleNamespace(state=False, probe=None)
        settings = asdict(self.settings)
        seeds = {i: plan_seed(keeps[i], self.settings) for i in todo}
        if self.ray:
            return self._run_ray(todo, keeps, keys, labels, state_dict, teacher_blob,
                                 settings, seeds, results, want)
        if self.workers == 1:
            teacher = _loads(teacher_blob) if teacher_blob is not None else None
            for i in todo:
                prepared = self._prepare(i, keeps, keys, labels, state_dict, results, want)
                if prepared is not None:
                    module, bound = prepared
                    out = run_candidate(module, self.data, self.settings, seeds[i], teacher,
                                        want.state, bound)
                    self._finish(i, keeps, keys, labels, out, results)
            return
        pending = list(todo)
        for attempt in range(self.max_retries + 1):
            try:
                pool = self._local_pool()
                futures = {}
                for i in list(pending):
                    prepared = self._prepare(i, keeps, keys, labels, state_dict, results, want)
                    if prepared is None:
                        pending.remove(i)
                        continue
                    module, bound = prepared
                    futures[pool.submit(_worker_task, _dumps(module), teacher_blob, settings,
                                        seeds[i], want.state,
                                        None if bound is None else _dumps(bound))] = i
                while futures:
                    done, _ = wait(list(futures), return_when=FIRST_COMPLETED)
                    for f in sorted(done, key=lambda f: futures[f]):
                        i = futures.pop(f)
                        self._finish(i, keeps, keys, labels, f.result(), results)
                        pending.remove(i)
                return
            except BrokenProcessPool:
                # a worker died (killed, out of memory): start a fresh pool, rerun the rest
                self.retried += len(pending)
                self.log(f"evaluator: a worker process was lost; retrying {len(pending)} "
                         f"evaluation(s) (attempt {attempt + 1} of {self.max_retries})")
                if self._pool is not None:
                    self._pool.shutdown(wait=False, cancel_futures=True)
                self._pool = None
            except BaseException:
                # interrupted (SIGINT, SIGTERM via the CLI, an error in a callback): the
                # workers stop with the search instead of finishing work nobody collects
                self.terminate()
                raise
        raise RuntimeError(f"evaluator: worker processes kept dying; {len(pending)} "
                           "evaluation(s) not done")

    def _local_pool(self):
        if self._pool is None:
            ctx = torch.multiprocessing.get_context("spawn")
            self._pool = ProcessPoolExecutor(max_workers=self.workers, mp_context=ctx,
                                             initializer=_init_worker,
                                             initargs=(self.data, os.getpid()))
        return self._pool

    def _run_ray(self, todo, keeps, keys, labels, state_dict, teacher_blob, settings, seeds,
                 results, want) -> None:
        ray = import_ray()
        if self._ray_fn is None:
            # Retried here, not by Ray: the driver counts what a lost worker or node cost.
            self._ray_fn = ray.remote(num_cpus=1, max_retries=0)(_ray_task)
            self._ray_data = ray.put(self.data)
        refs, blobs, tries = {}, {}, {}

        def submit(i):
            refs[self._ray_fn.remote(self._ray_data, *blobs[i])] = i

        for i in todo:
            prepared = self._prepare(i, keeps, keys, labels, state_dict, results, want)
            if prepared is not None:
                module, bound = prepared
                blobs[i] = (_dumps(module), teacher_blob, settings, seeds[i], want.state,
                            None if bound is None else _dumps(bound))
                tries[i] = 0
                submit(i)
        try:
            while refs:
                done, _ = ray.wait(list(refs), num_returns=1)
                for ref in done:
                    i = refs.pop(ref)
                    try:
                        out = ray.get(ref)
                    except ray.exceptions.RayTaskError as exc:  # the evaluation itself failed
                        raise exc.as_instanceof_cause() from None
                    except ray.exceptions.RayError as exc:  # its worker or node was lost
                        tries[i] += 1
                        if tries[i] > self.max_retries:
                            raise RuntimeError(f"evaluator: plan {labels[i] or keys[i]} lost "
                                               f"its Ray worker {tries[i]} times ({exc})") from exc
                        self.retried += 1
                        self._save_stats()
                        self.log(f"evaluator: a Ray worker or node was lost ("
                                 f"{type(exc).__name__}); retrying plan {labels[i] or keys[i]} "
                                 f"(attempt {tries[i]} of {self.max_retries})")
                        submit(i)
                        continue
                    self._finish(i, keeps, keys, labels, out, results)
        except BaseException:
            for ref in refs:
                ray.cancel(ref, force=True)
            raise
        finally:
            self._save_stats()

    def _save_stats(self) -> None:
        """This process's counts (run, read back from the cache, retried) next to the cache,
        for the report: what a resumed or disturbed search really spent."""
        if self.cache_dir is not None:
            write_json(self.cache_dir / STATS_FILE,
                       {"fresh": self.fresh, "cached": self.cached, "retried": self.retried,
                        "backend": self.backend}, every_rank=True)


def _teacher(graph: ChannelGraph, teacher_state) -> nn.Module:
    import copy

    t = copy.deepcopy(graph.module)
    t.load_state_dict(dict(teacher_state))
    return t.eval()


def steps_for(ctx, evaluations: float, at_least: int = 1) -> int:
    """Optimizer steps per candidate when the search budget `ctx.epochs` (epochs of the
    training split) is split over about `evaluations` candidate fine-tunes."""
    per_epoch = max(1, steps_per_epoch(len(ctx.data.train), ctx.batch_size, None))
    return max(int(at_least), int(math.floor(ctx.epochs * per_epoch / max(evaluations, 1))))


def make_evaluator(ctx, settings: EvalSettings, name: str, data=None,
                   data_tag: str = "") -> CandidateEvaluator:
    """The evaluator of a search: the backend from the context (`ctx.workers`, `ctx.ray`),
    the cache in `ctx.state_dir / f"evals-{name}"`; `data` (default `ctx.data`): another
    split to train and score on, named by `data_tag` in the cache key."""
    ev = CandidateEvaluator(ctx.graph, ctx.data if data is None else data, settings,
                            cache_dir=Path(ctx.state_dir) / f"evals-{name}",
                            workers=getattr(ctx, "workers", 1), ray=getattr(ctx, "ray", None),
                            log=ctx.log, on_result=getattr(ctx, "on_result", None),
                            data_tag=data_tag)
    return ev


__all__ = ["CandidateEvaluator", "EvalSettings", "EvalResult", "make_evaluator", "steps_for",
           "plan_key", "plan_seed", "canonical_keep", "run_candidate", "default_workers",
           "Probe", "GateResponses"]


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
