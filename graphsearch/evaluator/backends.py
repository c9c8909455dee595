"""Where candidate evaluations run: in the search's process, on local worker processes, or
on a Ray cluster. Every backend runs the same `run_candidate` on one torch thread with the
seed the task carries, so the scores do not depend on the backend.

A backend takes a stream of `Task`s (a slim module and its seed) with what the batch shares
(`Batch`: the settings, the teacher, whether the weights come back) and calls `done(task,
out)` with each result as it arrives, in the search's process. The data travels once per
worker (local: as the pool's initializer argument; Ray: once through the object store), the
slim module once per task. A lost worker process or Ray node costs only the tasks it was
running: the backend runs them again (`max_retries`) and counts them in `retried`.

Worker processes never outlive the search that started them (`die_with_parent`), and an
interrupted search ends its workers instead of leaving them on work nobody collects.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterable

import torch
from torch import nn

from ..load import UserError
from .candidate import EvalSettings, dumps, loads, pack_result, run_candidate


@dataclass
class Task:
    """One candidate to run."""

    index: int  # its place in the batch
    name: str  # its label or key, for messages
    module: nn.Module  # the slim model, trained in place where the task runs
    seed: int
    probe: Callable[[nn.Module], object] | None = None  # a bound probe (`probes.Probe.bind`)


@dataclass(frozen=True)
class Batch:
    """What every task of a batch shares."""

    settings: EvalSettings
    teacher: bytes | None = None  # the teacher module (`dumps`), when the settings distill
    return_state: bool = False


Done = Callable[[Task, dict], None]


def wire(task: Task, batch: Batch) -> tuple:
    """A task as the arguments of `candidate_task` (bytes and plain values: picklable
    anywhere)."""
    return (dumps(task.module), batch.teacher, asdict(batch.settings), task.seed,
            batch.return_state, None if task.probe is None else dumps(task.probe))


def candidate_task(data, module_blob: bytes, teacher_blob: bytes | None, settings: dict,
                   seed: int, return_state: bool = False, probe_blob: bytes | None = None) -> dict:
    """A task, in a worker process or a Ray task (whose process title names it:
    `ray::candidate_task`): `run_candidate` on its arguments."""
    crash_if_asked()
    torch.set_num_threads(1)
    teacher = loads(teacher_blob) if teacher_blob is not None else None
    probe = loads(probe_blob) if probe_blob is not None else None
    return pack_result(run_candidate(loads(module_blob), data, EvalSettings(**settings), seed,
                                     teacher, return_state, probe))


def crash_if_asked() -> None:
    """Fault injection for the tests of worker loss: when GRAPHSEARCH_TEST_CRASH_DIR names a
    folder holding a file `crash-once`, the first task to claim it kills its own worker
    process. (An environment variable, because it must reach Ray's worker processes too.)"""
    folder = os.environ.get("GRAPHSEARCH_TEST_CRASH_DIR")
    if not folder:
        return
    flag = Path(folder) / "crash-once"
    try:
        os.rename(flag, Path(folder) / f"crashed-{os.getpid()}")
    except OSError:
        return
    os._exit(1)


class Backend:
    """The interface; see the module docstring."""

    name = "?"
    retried = 0  # tasks run again because their worker process or node was lost

    @property
    def parallelism(self) -> int:
        """How many evaluations run at once (batches this wide keep every worker busy)."""
        return 1

    def run(self, tasks: Iterable[Task], batch: Batch, done: Done) -> None:
        raise NotImplementedError

    def close(self) -> None:
        """Let the workers finish and end them (a search done)."""

    def terminate(self) -> None:
        """End the workers now, the tasks in flight abandoned (an interrupted search)."""


class InProcess(Backend):
    """Each task in the search's own process, one after the other."""

    name = "in-process"

    def __init__(self, data):
        self.data = data

    def run(self, tasks, batch, done):
        teacher = loads(batch.teacher) if batch.teacher is not None else None
        for task in tasks:
            done(task, run_candidate(task.module, self.data, batch.settings, task.seed, teacher,
                                     batch.return_state, task.probe))


# --------------------------------------------------------------------------- local workers


def default_workers() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


class LocalWorkers(Backend):
    """`workers` processes on this machine (spawned, one torch thread each)."""

    def __init__(self, data, workers: int, log: Callable[[str], None] = print,
                 max_retries: int = 3):
        self.data, self.workers, self.log, self.max_retries = data, int(workers), log, max_retries
        self.name = f"{self.workers} local workers"
        self.pool: ProcessPoolExecutor | None = None
        self.retried = 0

    @property
    def parallelism(self) -> int:
        return self.workers

    def _pool(self) -> ProcessPoolExecutor:
        if self.pool is None:
            ctx = torch.multiprocessing.get_context("spawn")
            self.pool = ProcessPoolExecutor(max_workers=self.workers, mp_context=ctx,
                                            initializer=_init_worker,
                                            initargs=(self.data, os.getpid()))
        return self.pool

    def run(self, tasks, batch, done):
        tasks = iter(tasks)
        pending: dict[int, Task] = {}  # submitted, not done
        for attempt in range(self.max_retries + 1):
            try:
                pool = self._pool()
                futures = {pool.submit(_worker_task, *wire(t, batch)): t
                           for t in pending.values()}
                for t in tasks:
                    pending[t.index] = t
                    futures[pool.submit(_worker_task, *wire(t, batch))] = t
                while futures:
                    finished, _ = wait(list(futures), return_when=FIRST_COMPLETED)
                    for f in sorted(finished, key=lambda f: futures[f].index):
                        t = futures.pop(f)
                        done(t, f.result())
                        pending.pop(t.index)
                return
            except BrokenProcessPool:
                # a worker died (killed, out of memory): start a fresh pool, rerun the rest
                self.retried += len(pending)
                self.log(f"evaluator: a worker process was lost; retrying {len(pending)} "
                         f"evaluation(s) (attempt {attempt + 1} of {self.max_retries})")
                if self.pool is not None:
                    self.pool.shutdown(wait=False, cancel_futures=True)
                self.pool = None
            except BaseException:
                # interrupted (SIGINT, SIGTERM via the CLI, an error in a callback): the
                # workers stop with the search instead of finishing work nobody collects
                self.terminate()
                raise
        raise RuntimeError(f"evaluator: worker processes kept dying; {len(pending)} "
                           "evaluation(s) not done")

    def close(self):
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)
            self.pool = None

    def terminate(self):
        pool, self.pool = self.pool, None
        if pool is None:
            return
        processes = list((getattr(pool, "_processes", None) or {}).values())
        for p in processes:
            if p.is_alive():
                p.kill()
        pool.shutdown(wait=False, cancel_futures=True)
        for p in processes:
            p.join(timeout=5)


_WORKER_DATA = None  # a local worker's copy of the data, set once by its initializer


def _init_worker(data, parent: int | None = None) -> None:
    global _WORKER_DATA
    if parent is not None:
        die_with_parent(parent)
    # Ctrl-C in a terminal reaches the whole process group: the driver handles it (and ends
    # its workers); a worker printing its own KeyboardInterrupt traceback would only add noise.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    torch.set_num_threads(1)
    _WORKER_DATA = data


def _worker_task(*args) -> dict:
    return candidate_task(_WORKER_DATA, *args)


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


# --------------------------------------------------------------------------- Ray


def import_ray():
    try:
        import ray  # noqa: F401
    except ImportError as exc:
        raise UserError("--ray needs Ray, an optional extra: pip install 'graphsearch[ray]' "
                        "(or run without --ray to evaluate on local worker processes)") from exc
    return ray


class RayCluster(Backend):
    """Ray tasks on a cluster (`address`: "auto" or HOST:PORT), one CPU each. A task whose
    worker or node is lost is retried here, not by Ray, so that the driver counts it;
    `on_retry` is called after each (the evaluator saves its counts)."""

    def __init__(self, data, address: str, log: Callable[[str], None] = print,
                 max_retries: int = 3, on_retry: Callable[[], None] | None = None):
        self.data, self.address, self.log = data, address, log
        self.max_retries, self.on_retry = max_retries, on_retry
        self.name = f"ray({address})"
        self.retried = 0
        self._fn = self._data_ref = None
        ray = import_ray()
        if not ray.is_initialized():
            try:
                ray.init(address=address, log_to_driver=False)
            except Exception as exc:  # noqa: BLE001
                raise UserError(f"--ray {address}: cannot connect to a Ray cluster ({exc}); "
                                "start one with `ray start --head` or give its address "
                                "(HOST:6379)") from exc

    @property
    def parallelism(self) -> int:
        return max(1, int(import_ray().cluster_resources().get("CPU", 1)))

    def run(self, tasks, batch, done):
        ray = import_ray()
        if self._fn is None:
            self._fn = ray.remote(num_cpus=1, max_retries=0)(candidate_task)
            self._data_ref = ray.put(self.data)
        refs: dict = {}
        args: dict[int, tuple] = {}
        tries: dict[int, int] = {}

        def submit(t: Task):
            refs[self._fn.remote(self._data_ref, *args[t.index])] = t

        for t in tasks:
            args[t.index], tries[t.index] = wire(t, batch), 0
            submit(t)
        try:
            while refs:
                ready, _ = ray.wait(list(refs), num_returns=1)
                for ref in ready:
                    t = refs.pop(ref)
                    try:
                        out = ray.get(ref)
                    except ray.exceptions.RayTaskError as exc:  # the evaluation itself failed
                        raise exc.as_instanceof_cause() from None
                    except ray.exceptions.RayError as exc:  # its worker or node was lost
                        tries[t.index] += 1
                        if tries[t.index] > self.max_retries:
                            raise RuntimeError(f"evaluator: plan {t.name} lost its Ray worker "
                                               f"{tries[t.index]} times ({exc})") from exc
                        self.retried += 1
                        if self.on_retry is not None:
                            self.on_retry()
                        self.log(f"evaluator: a Ray worker or node was lost ("
                                 f"{type(exc).__name__}); retrying plan {t.name} "
                                 f"(attempt {tries[t.index]} of {self.max_retries})")
                        submit(t)
                        continue
                    done(t, out)
        except BaseException:
            for ref in refs:
                ray.cancel(ref, force=True)
            raise

    def terminate(self):
        pass  # tasks in flight are cancelled by `run` as it unwinds
