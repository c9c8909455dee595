"""Faults a long search meets: a driver stopped in any way (no worker process outlives it),
and bad input or a full disk (one line, exit 2, nothing of the user's lost or half-written,
the last good checkpoint kept, one run per --out at a time). Linux process checks read /proc."""

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

TESTS = Path(__file__).parent
linux_only = pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads /proc")


def _alive(pid: int) -> bool:
    """A process that runs (a zombie, killed but not yet reaped by init, counts as gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def _children(pid: int) -> list[int]:
    out = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                if int(Path(d, "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                    out.append(int(d.name))
            except (OSError, IndexError, ValueError):
                pass
    return out


def _wait_gone(pids, seconds: float) -> list[int]:
    deadline = time.time() + seconds
    while time.time() < deadline:
        left = [p for p in pids if _alive(p)]
        if not left:
            return []
        time.sleep(0.2)
    return [p for p in pids if _alive(p)]


# A driver: two local workers, first a quick batch (so both workers are up and initialised),
# then a batch long enough to be busy when the test stops the driver.
DRIVER = textwrap.dedent("""
    import os, sys, torch
    sys.path.insert(0, sys.argv[1])
    from graphsearch.analysis import analyze
    from graphsearch.data import load_dataset
    from graphsearch.evaluator import CandidateEvaluator, EvalSettings
    from tiny_model import Tiny

    if __name__ == "__main__":  # the workers are spawned: they import this file
        torch.set_num_threads(1)
        data = load_dataset("synthetic:100:4", image_size=16, cache_dir=False)
        model = Tiny()
        graph = analyze(model, (torch.zeros(1, 3, 16, 16),))
        g = graph.prunable_groups[0].id
        ev = CandidateEvaluator(graph, data, EvalSettings(steps=0, lr=0.01, batch_size=50),
                                workers=2)
        ev.evaluate([{g: [0, 1]}, {g: [0, 1, 2]}, {g: [0]}, {g: [1]}], model.state_dict())
        ev.settings = EvalSettings(steps=10 ** 6, lr=0.01, batch_size=50)
        print("busy", flush=True)
        with ev:  # the same, initialised workers, now on a long batch
            ev.evaluate([{g: list(range(k))} for k in range(2, 8)], model.state_dict())
""")


@linux_only
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT, signal.SIGKILL],
                         ids=["SIGTERM", "SIGINT", "SIGKILL"])
def test_no_local_worker_outlives_its_driver(sig, tmp_path):
    script = tmp_path / "driver.py"
    script.write_text(DRIVER)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, str(script), str(TESTS)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)
    workers = []
    try:
        assert proc.stdout.readline().strip() == "busy", proc.stderr.read()
        time.sleep(1.0)  # both workers inside a long evaluation
        workers = _children(proc.pid)
        assert len(workers) >= 2, workers  # two workers (and multiprocessing's tracker)
        os.kill(proc.pid, sig)
        proc.wait(timeout=30)
        assert _wait_gone(workers, 8.0) == [], "worker processes outlived their driver"
        assert "Traceback" not in proc.stderr.read() or sig != signal.SIGTERM
    finally:  # a failed test leaves no process behind either
        if proc.poll() is None:
            proc.kill()
        for p in workers + _children(proc.pid):
            if _alive(p):
                os.kill(p, signal.SIGKILL)
