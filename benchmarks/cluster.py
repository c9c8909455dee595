"""A multi-node Ray cluster on one machine: a search that loses a worker node, and a driver
killed with kill -9 and resumed.

Starts a head and two worker nodes with `ray start` on 127.0.0.1 (one CPU each, their own
temporary folder; only this cluster's processes are ever stopped, by pid, never `ray stop`,
which would stop every Ray on the machine), then runs `graphsearch optimize --ray ADDRESS`
on the tests' tiny model three times:

1. undisturbed: the reference plan;
2. a worker node lost: once some evaluations have finished, the raylet of a worker node that
   is running an evaluation is killed (SIGKILL; the node and its workers die with it); the
   search must finish with the reference plan, its report counting the evaluations retried;
3. the driver killed: once some evaluations have finished, the driver gets kill -9 while an
   evaluation runs on the cluster; no task of it may keep running there; `--resume` must
   finish with the reference plan without running a finished evaluation again.

Prints a markdown table (and writes it with `--out-md`): run, nodes, fault, evaluations run /
read back / retried, wall time, plan equal to the reference.

    .venv/bin/python benchmarks/cluster.py [--method autoshrink] [--out-md FILE] [--keep DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
TINY = ROOT / "tests" / "tiny_model.py"
SEARCH = ["--data", "synthetic:240:4", "--baseline-epochs", "1", "--finetune-epochs", "0",
          "--search-epochs", "1", "--batch-size", "60", "--round-to", "4", "--flops", "0.4",
          "--latency-batch", "1", "--quiet"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def processes_with(text: str) -> list[int]:
    """Pids whose command line holds `text` (this cluster's processes name its temp folder)."""
    out = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit() and int(d.name) != os.getpid():
            try:
                if text.encode() in (d / "cmdline").read_bytes():
                    out.append(int(d.name))
            except OSError:
                pass
    return out


def cmdline(pid: int) -> bytes:
    """A process's command line (b"" once it is gone)."""
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


def alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


class Cluster:
    """A head and `workers` worker nodes started with `ray start` on 127.0.0.1."""

    # A loaded machine: `ray start` waits a fixed 30 s for its raylet to register (then
    # gives up: "The current node timed out during startup"), so a failed start is retried;
    # and the cluster's own timeouts are made generous (worker registration, GCS requests,
    # health checks: a busy node is not taken for a dead one; a killed one is, within ~30 s).
    ATTEMPTS = 4
    SLOW_MACHINE = {"RAY_worker_register_timeout_seconds": "600",
                    "RAY_gcs_server_request_timeout_seconds": "300",
                    "RAY_gcs_rpc_server_reconnect_timeout_s": "300",
                    "RAY_health_check_initial_delay_ms": "10000",
                    "RAY_health_check_period_ms": "3000",
                    "RAY_health_check_timeout_ms": "10000",
                    "RAY_health_check_failure_threshold": "10"}

    def __init__(self, workers: int = 2, cpus: int = 1, log=print):
        self.tmp = Path(tempfile.mkdtemp(prefix="gs-ray-", dir="/tmp"))
        # Its own authentication token: Ray's default, ~/.ray/auth_token, is one file per
        # user that another Ray on the machine may rewrite meanwhile (it did: the worker
        # nodes were refused with InvalidAuthToken).
        self.auth = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": uuid.uuid4().hex}
        self.env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "OMP_NUM_THREADS": "1",
                    **self.SLOW_MACHINE, **self.auth}
        self.log, self.attempts = log, []
        common = ["--node-ip-address", "127.0.0.1", "--num-cpus", str(cpus),
                  "--disable-usage-stats"]
        self.worker_ports = []
        self.port = 0
        try:
            for attempt in range(self.ATTEMPTS):
                self.port = free_port()
                self.address = f"127.0.0.1:{self.port}"
                if self._ray(["start", "--head", "--port", str(self.port), "--temp-dir",
                              str(self.tmp), "--include-dashboard", "false", *common],
                             "head", attempt, f":{self.port}"):
                    break
            else:
                raise RuntimeError(f"the head did not start in {self.ATTEMPTS} attempts: "
                                   f"{'; '.join(self.attempts)}")
            for w in range(workers):
                for attempt in range(self.ATTEMPTS):
                    nm = free_port()
                    if self._ray(["start", "--address", self.address, "--node-manager-port",
                                  str(nm), *common], f"worker {w + 1}", attempt,
                                 f"--node_manager_port={nm}"):
                        self.worker_ports.append(nm)
                        break
                else:
                    raise RuntimeError(f"worker node {w + 1} did not start in {self.ATTEMPTS} "
                                       f"attempts: {'; '.join(self.attempts)}")
        except BaseException:
            self.stop()  # a node that failed to start leaves nothing behind
            raise
        self.nodes = 1 + workers

    def _ray(self, args, what: str, attempt: int, marker: str) -> bool:
        """Run `ray ARGS`; on failure, end what it started (the processes naming `marker`),
        record why, and return False."""
        t = time.time()
        r = subprocess.run([str(BIN / "ray"), *args], capture_output=True, text=True,
                           env=self.env, timeout=600)
        took = time.time() - t
        if r.returncode == 0:
            self.attempts.append(f"{what}: started in {took:.0f} s (attempt {attempt + 1})")
            self.log(self.attempts[-1])
            return True
        why = next((ln.strip() for ln in (r.stdout + r.stderr).splitlines()
                    if "timed out" in ln or "Error" in ln or "error" in ln), "no reason given")
        self.attempts.append(f"{what}: attempt {attempt + 1} failed after {took:.0f} s "
                             f"({why[:200]})")
        self.log(self.attempts[-1])
        self._end(processes_with(marker))
        time.sleep(5)
        return False

    @staticmethod
    def _end(pids) -> None:
        for p in pids:
            try:
                os.kill(p, signal.SIGTERM)
            except ProcessLookupError:
                pass
        deadline = time.time() + 10
        while time.time() < deadline and any(alive(p) for p in pids):
            time.sleep(0.2)
        for p in pids:
            if alive(p):
                os.kill(p, signal.SIGKILL)

    def raylet_of(self, node_manager_port: int) -> int:
        pids = [p for p in processes_with(f"--node_manager_port={node_manager_port}")
                if b"raylet" in cmdline(p).split(b"\0")[0]]
        if len(pids) != 1:
            raise RuntimeError(f"raylet of port {node_manager_port}: found {pids}")
        return pids[0]

    def kill_busy_worker_node(self, timeout: float = 300) -> int:
        """Kill (SIGKILL) the raylet of a worker node that is running an evaluation right
        now (a task process is a child of its node's raylet), so that the loss costs an
        evaluation in flight; returns the node's number."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            raylets = {self.raylet_of(port): i for i, port in enumerate(self.worker_ports)}
            for p in self.task_processes():
                try:
                    ppid = int(Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()[1])
                except (OSError, ValueError, IndexError):
                    continue
                if ppid in raylets:
                    os.kill(ppid, signal.SIGKILL)
                    return raylets[ppid] + 1
            time.sleep(0.05)
        raise RuntimeError(f"no worker node ran an evaluation within {timeout} s")

    @staticmethod
    def task_processes() -> list[int]:
        """Ray workers running one of graphsearch's evaluations right now."""
        return [p for p in processes_with("ray::") if b"candidate_task" in cmdline(p)]

    def stop(self) -> None:
        """Stop this cluster's processes (by pid: the ones naming its temp folder or port)."""
        pids = set(processes_with(str(self.tmp)))
        if self.port:
            pids |= set(processes_with(f":{self.port}"))
        self._end(pids)
        shutil.rmtree(self.tmp, ignore_errors=True)


def optimize(args, out: Path, *extra) -> subprocess.Popen:
    cmd = [str(BIN / "graphsearch"), "optimize", str(TINY), "--method", args.method,
           "--ray", args.address, "--out", str(out), *SEARCH, *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "GRAPHSEARCH_CACHE": str(out.parent / "cache"),
           **Cluster.SLOW_MACHINE, **args.ray_auth}
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env)


def finished_evaluations(out: Path, method: str) -> int:
    folder = out / ".state" / f"evals-{method}"
    return len([p for p in folder.glob("*.json") if p.name != "stats.json"]) \
        if folder.exists() else 0


def wait_for_evaluations(proc, out: Path, method: str, n: int, timeout: float = 900,
                         seen: list | None = None) -> int:
    """Wait for `n` finished evaluations; `seen` collects how many task processes were
    running at each look (the check that they are found at all)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if seen is not None:
            seen.append(len(Cluster.task_processes()))
        k = finished_evaluations(out, method)
        if k >= n:
            return k
        if proc.poll() is not None:
            raise RuntimeError(f"the run ended before {n} evaluations: {proc.stderr.read()}")
        time.sleep(0.2)
    raise RuntimeError(f"fewer than {n} evaluations after {timeout} s")


def finish(proc, timeout: float = 1800) -> tuple[int, str]:
    _, err = proc.communicate(timeout=timeout)
    return proc.returncode, err


def report_of(out: Path) -> dict:
    return json.loads((out / "report.json").read_text())


def run_all(args) -> list[dict]:
    work = Path(args.keep or tempfile.mkdtemp(prefix="gs-cluster-"))
    work.mkdir(parents=True, exist_ok=True)
    rows = []
    t = time.time()
    cluster = Cluster(workers=2, log=lambda m: print(m, file=sys.stderr, flush=True))
    args.address, args.ray_auth = cluster.address, cluster.auth
    rows.append({"run": "cluster start", "seconds": time.time() - t,
                 "fault": "; ".join(cluster.attempts)})
    try:
        # 1. undisturbed
        t = time.time()
        code, err = finish(optimize(args, work / "reference"))
        assert code == 0, err
        ref = report_of(work / "reference")
        rows.append({"run": "undisturbed", "fault": "none", "seconds": time.time() - t,
                     "evaluations": ref.get("evaluations", {}), "equal": True})
        # 2. a worker node lost mid-batch
        t = time.time()
        proc = optimize(args, work / "node-lost")
        done = wait_for_evaluations(proc, work / "node-lost", args.method, args.after)
        busy = len(cluster.task_processes())
        node = cluster.kill_busy_worker_node()
        code, err = finish(proc)
        assert code == 0, err
        rep = report_of(work / "node-lost")
        rows.append({"run": "worker node lost", "seconds": time.time() - t,
                     "fault": f"raylet of worker node {node} killed (SIGKILL) while it ran "
                              f"an evaluation, after {done} finished ({busy} task process(es) "
                              "running)",
                     "finished_before": done, "evaluations": rep.get("evaluations", {}),
                     "equal": rep["keep"] == ref["keep"]})
        # 3. driver killed with kill -9, then --resume (2 nodes left)
        t = time.time()
        proc = optimize(args, work / "driver-killed")
        seen: list[int] = []
        done = wait_for_evaluations(proc, work / "driver-killed", args.method, args.after,
                                    seen=seen)
        wait_until = time.time() + 300  # kill it while an evaluation runs on the cluster
        while not cluster.task_processes() and time.time() < wait_until and proc.poll() is None:
            time.sleep(0.05)
        in_flight = len(cluster.task_processes())
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        killed_at = time.time()
        while cluster.task_processes() and time.time() - killed_at < 30:
            time.sleep(0.2)
        orphan_s = time.time() - killed_at
        left = cluster.task_processes()
        before = finished_evaluations(work / "driver-killed", args.method)
        code, err = finish(optimize(args, work / "driver-killed", "--resume"))
        assert code == 0, err
        rep = report_of(work / "driver-killed")
        rows.append({"run": "driver kill -9, --resume", "seconds": time.time() - t,
                     "fault": f"driver killed (SIGKILL) after {done} evaluations, "
                              f"{in_flight} task process(es) running (up to {max(seen)} seen "
                              f"while it ran); {len(left)} task process(es) left after "
                              f"{orphan_s:.1f} s",
                     "evaluations": rep.get("evaluations", {}),
                     "equal": rep["keep"] == ref["keep"], "finished_before": before,
                     "orphans": len(left)})
    finally:
        cluster.stop()
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    return rows


def table(rows, args) -> str:
    load = os.getloadavg()[0]
    lines = [f"# Multi-node Ray cluster on one machine ({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())})",
             "",
             f"Command: `.venv/bin/python benchmarks/cluster.py --method {args.method} "
             f"--after {args.after}`; a head and 2 worker nodes (`ray start`, 127.0.0.1, one "
             f"CPU each, 3 nodes); `optimize --ray` of `tests/tiny_model.py` with "
             f"{args.method} ({' '.join(SEARCH)}). Machine: {os.cpu_count()} CPUs, load "
             f"average {load:.1f} at the end (shared with other jobs).", "",
             "| run | fault | finished before the fault | evaluations run | read back | "
             "retried | wall s | plan equal |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        e = r.get("evaluations", {})
        lines.append(f"| {r['run']} | {r.get('fault', '')} | {r.get('finished_before', '')} | "
                     f"{e.get('fresh', '')} | {e.get('cached', '')} | {e.get('retried', '')} | "
                     f"{r['seconds']:.0f} | "
                     f"{'' if 'equal' not in r else 'yes' if r['equal'] else 'NO'} |")
    lines += ["", "Evaluations run / read back / retried: the report's `evaluations` (the "
              "evaluator's counts in the run that finished; after --resume, the method's own "
              "state may skip finished work without asking the evaluator, so run + read back "
              "can be below the reference's count). Nothing finished ran again when run + "
              "finished before the fault = the reference's run count."]
    return "\n".join(lines) + "\n"


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--method", default="autoshrink")
    p.add_argument("--after", type=int, default=3, help="finished evaluations before a fault")
    p.add_argument("--out-md", help="also write the table here")
    p.add_argument("--keep", help="keep the runs' folders here")
    args = p.parse_args()
    try:
        rows = run_all(args)
    except Exception as exc:  # noqa: BLE001 (say exactly what happened, in the table too)
        rows = [{"run": "FAILED", "fault": f"{type(exc).__name__}: "
                 + " ".join(str(exc).split())[:1500], "seconds": 0.0, "equal": False}]
    text = table(rows, args)
    print(text)
    if args.out_md:
        Path(args.out_md).write_text(text)
    ok = all(r.get("equal", True) for r in rows) and all(not r.get("orphans") for r in rows)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
