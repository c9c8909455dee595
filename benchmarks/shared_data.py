"""Data that stays where it is, simulated at ImageNet's per-image size with the evaluator's
real code.

A synthetic set of N images of 3x224x224 (150,528 bytes each, ImageNet's usual input) is
generated in chunks straight into the memory-mapped decode cache (`load_dataset(...,
mapped=True)`, what `--shared-data DIR` and the default above 2 GiB do), then a batch of
candidate evaluations runs on local worker processes (`CandidateEvaluator`, the same code as
`optimize`) on a small CNN for 224x224 input. Measured:

- what travels: the pickled splits each worker receives once (a file path, row numbers and
  labels) against the decoded arrays the driver used to ship; the bytes of one task (the
  slim module and the settings);
- memory: the driver's and each worker's anonymous memory (RssAnon: private copies) and
  file-backed memory (RssFile: pages of the mapped file, shared by the processes of a
  machine and dropped by the kernel under pressure), sampled during the batch;
- throughput: training images per second per worker in the batch, and the rate at which one
  process gathers random batches from the mapped file.

    .venv/bin/python benchmarks/shared_data.py [--images 6000] [--workers 2] [--out-md FILE]
"""

from __future__ import annotations

import argparse
import os
import pickle
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
IMAGE_BYTES = 3 * 224 * 224
IMAGENET = 1_281_167


class SmallNet(nn.Module):
    """A small CNN for 224x224: compute stays small, so the data path shows."""

    def __init__(self, classes: int):
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 7, stride=4, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.conv = nn.Conv2d(16, 32, 3, stride=2, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(32)
        self.fc = nn.Linear(32, classes)

    def forward(self, x):
        x = torch.relu(self.bn1(self.stem(x)))
        x = torch.relu(self.bn2(self.conv(x)))
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


MAPPED = ""  # the mapped file's path, once known


def mem(pid: int | str = "self") -> dict[str, float]:
    """RssAnon of a process and the resident pages of the mapped file in it, in MiB."""
    out = {"RssAnon": 0.0, "mapped": 0.0}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        k, _, v = line.partition(":")
        if k == "RssAnon":
            out[k] = int(v.split()[0]) / 1024
    if MAPPED:
        inside = False
        for line in Path(f"/proc/{pid}/smaps").read_text().splitlines():
            if "-" in line.split(" ", 1)[0] and ":" not in line.split(" ", 1)[0]:
                inside = line.rstrip().endswith(MAPPED)
            elif inside and line.startswith("Rss:"):
                out["mapped"] += int(line.split()[1]) / 1024
    return out


class Sampler(threading.Thread):
    """The peak RssAnon / RssFile of the driver and each worker while a batch runs."""

    def __init__(self, pids_of):
        super().__init__(daemon=True)
        self.pids_of, self.peak, self.stop = pids_of, {}, threading.Event()

    def run(self):
        while not self.stop.is_set():
            for name, pid in [("driver", "self")] + [(f"worker {i}", p)
                                                     for i, p in enumerate(self.pids_of())]:
                try:
                    m = mem(pid)
                except OSError:
                    continue
                cur = self.peak.setdefault(name, {"RssAnon": 0.0, "mapped": 0.0})
                for k, v in m.items():
                    cur[k] = max(cur[k], v)
            time.sleep(0.2)


def mib(n: float) -> str:
    """Bytes in the unit that reads best."""
    for unit, size in (("GiB", 2 ** 30), ("MiB", 2 ** 20), ("KiB", 2 ** 10)):
        if n >= size:
            return f"{n / size:,.1f} {unit}"
    return f"{n:.0f} bytes"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--images", type=int, default=6000)
    ap.add_argument("--classes", type=int, default=100)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--candidates", type=int, default=4)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--cache", help="the folder of the mapped data (default: a temporary one)")
    ap.add_argument("--out-md")
    args = ap.parse_args()
    torch.set_num_threads(1)

    from graphsearch.analysis import analyze
    from graphsearch.data import load_dataset
    from graphsearch.evaluator import CandidateEvaluator, EvalSettings
    from graphsearch.evaluator.backends import Batch, Task, wire

    tmp = tempfile.TemporaryDirectory(prefix="gs-shared-data-")
    cache = Path(args.cache or tmp.name)
    rows = []
    existed = any(cache.glob("synthetic.mapped-*.u8"))
    before = mem()
    t0 = time.time()
    data = load_dataset(f"synthetic:{args.images}:{args.classes}", image_size=224,
                        cache_dir=cache, mapped=True, test_fraction=0.0)
    t_load = time.time() - t0
    after = mem()
    search = data.for_search()
    global MAPPED
    MAPPED = data.train.mapped.path
    n = args.images
    rows.append(("data", f"{n:,} synthetic images of 3x224x224 ({mib(n * IMAGE_BYTES)} "
                 "decoded), " + ("mapped from the file an earlier run generated"
                                 if existed else "generated in chunks into the mapped file"),
                 f"{t_load:.1f} s; driver RssAnon +{after['RssAnon'] - before['RssAnon']:.0f} "
                 "MiB"))
    shipped = len(pickle.dumps(search))
    rows.append(("sent once per worker", f"the splits as a path, row numbers and labels: "
                 f"{mib(shipped)} ({shipped / n:.0f} bytes per image)",
                 f"in memory it would be {mib(n * IMAGE_BYTES)}"))

    model = SmallNet(args.classes)
    graph = analyze(model, (torch.zeros(1, 3, 224, 224),))
    groups = graph.prunable_groups
    plans = [{g.id: list(range(max(1, g.size - 4 * (i + 1)))) for g in groups}
             for i in range(args.candidates)]
    settings = EvalSettings(steps=args.steps, lr=0.01, batch_size=args.batch, val_samples=256)
    from graphsearch.passes.slim import slim

    task = Task(0, "p0", slim(graph, plans[0], model.state_dict()), 0)
    per_task = sum(len(a) if isinstance(a, bytes) else len(pickle.dumps(a))
                   for a in wire(task, Batch(settings)))
    rows.append(("sent per candidate", f"the slim module and the settings: {mib(per_task)} "
                 f"(this {sum(p.numel() for p in model.parameters()):,}-parameter model)",
                 "no images"))

    ev = CandidateEvaluator(graph, search, settings, workers=args.workers, log=lambda m: None)
    pids = lambda: [p.pid for p in (getattr(ev.runs_on.pool, "_processes", None) or {}).values()]  # noqa: E731
    # start every worker (import torch, map the data): one warm-up plan each
    ev.evaluate([{g.id: list(range(g.size - 1)) for g in groups[:i + 1]}
                 for i in range(args.workers)], model.state_dict())
    idle = {f"worker {i}": mem(p) for i, p in enumerate(pids())}
    idle["driver"] = mem()
    sampler = Sampler(pids)
    sampler.start()
    t0 = time.time()
    results = ev.evaluate(plans, model.state_dict())
    wall = time.time() - t0
    sampler.stop.set()
    sampler.join()
    ev.close()
    trained = len(results) * args.steps * args.batch
    scored = len(results) * min(256, len(search.val))
    per_worker = (trained + scored) / wall / args.workers
    rows.append(("batch", f"{len(results)} candidates x {args.steps} steps x batch "
                 f"{args.batch}, scored on 256 validation images, {args.workers} workers",
                 f"{wall:.1f} s: {per_worker:.0f} images/s per worker "
                 f"({mib(per_worker * IMAGE_BYTES)}/s read from the file)"))
    for name, m in sorted(sampler.peak.items()):
        between = idle.get(name, {}).get("RssAnon", float("nan"))
        rows.append((f"memory, {name}", f"private (RssAnon) {between:.0f} MiB "
                     f"between batches, {m['RssAnon']:.0f} MiB peak; pages of the mapped file "
                     f"{m['mapped']:.0f} MiB peak",
                     "file pages: shared by the processes of a machine, reclaimable"))

    g = torch.Generator().manual_seed(0)
    for augment in (False, True):
        t0 = time.time()
        got = 0
        while time.time() - t0 < 5:
            idx = torch.randint(0, len(search.train), (args.batch,), generator=g)
            search.train.get_batch(idx, augment=augment, aug_seed=1)
            got += args.batch
        rate = got / (time.time() - t0)
        rows.append(("gather" + (", augmented" if augment else ""),
                     f"random batches of {args.batch} from the mapped training split, one "
                     "process, page cache warm" + (", crop and flip" if augment else ""),
                     f"{rate:.0f} images/s ({mib(rate * IMAGE_BYTES)}/s)"))

    load = os.getloadavg()
    lines = [f"# Data that stays where it is: ImageNet-sized images, simulated",
             "",
             f"Command: `{Path(sys.executable).name} benchmarks/shared_data.py "
             f"{' '.join(sys.argv[1:])}`; load average {load[0]:.2f} / {load[1]:.2f} / "
             f"{load[2]:.2f} on {os.cpu_count()} cores, {time.strftime('%Y-%m-%d %H:%M')}.",
             "", "| what | measured | note |", "| --- | --- | --- |"]
    lines += [f"| {a} | {b} | {c} |" for a, b, c in rows]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out_md:
        Path(args.out_md).write_text(text)


if __name__ == "__main__":
    main()
