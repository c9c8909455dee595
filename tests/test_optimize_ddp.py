"""`graphsearch optimize` as a whole under torchrun: two gloo processes reach what one process
reaches, every file is written once (by rank 0) and every log line appears once."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]

# No BatchNorm (per-rank batch statistics) and no dropout (per-rank RNG): with those, DDP is
# not meant to match one process (the same model as the DDP training test).
MODEL = """
import torch
from torch import nn


def build_model():
    torch.manual_seed(123)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(4),
                         nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 4))


def example_inputs():
    return (torch.zeros(1, 3, 32, 32),)
"""

# 160 images: 16 test, 16 validation, 128 training (8 batches of 16, split evenly over two
# ranks, so that DistributedSampler pads nothing).
ARGS = ["--method", "magnitude", "--data", "synthetic:160:4", "--flops", "0.5",
        "--finetune-epochs", "1", "--batch-size", "16"]


def _run(cmd, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "GRAPHSEARCH_CACHE": str(tmp_path / "cache"),
           "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300,
                          cwd=tmp_path)


def test_optimize_under_torchrun_matches_one_process(tmp_path):
    model = tmp_path / "model.py"
    model.write_text(MODEL)
    sys.path.insert(0, str(tmp_path))
    try:
        import importlib.util

        spec = importlib.util.spec_from_file_location("ddp_model", model)
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        torch.save(mod.build_model().state_dict(), tmp_path / "w.pt")
    finally:
        sys.path.remove(str(tmp_path))
    common = ["optimize", str(model), "--weights", str(tmp_path / "w.pt"), *ARGS]
    two = _run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                "--nproc_per_node", "2", "-m", "graphsearch.cli", *common,
                "--out", str(tmp_path / "two")], tmp_path)
    assert two.returncode == 0, two.stdout[-3000:] + two.stderr[-3000:]
    one = _run([sys.executable, "-m", "graphsearch.cli", *common, "--out",
                str(tmp_path / "one")], tmp_path)
    assert one.returncode == 0, one.stderr[-3000:]

    # Logs once: each stage's line and the summary appear as often as in one process.
    for line in ("search: magnitude", "fine-tune: 1 epochs", "test split (16 samples",
                 "baseline: top-1"):
        assert two.stderr.count(line) == 1 == one.stderr.count(line), (line, two.stderr)
    assert two.stdout.count("report:") == 1
    assert "Traceback" not in two.stderr

    # Written once: the same files, no leftover temporaries of a second writer.
    def files(d):
        return sorted(str(p.relative_to(d)) for p in d.rglob("*") if p.is_file())
    assert files(tmp_path / "two") == files(tmp_path / "one")
    assert not [f for f in files(tmp_path / "two") if f.endswith(".tmp")]

    a = json.loads((tmp_path / "one" / "report.json").read_text())
    b = json.loads((tmp_path / "two" / "report.json").read_text())
    assert a["keep"] == b["keep"] and a["widths"] == b["widths"]
    # The same sample counts; accuracies within one sample of each split (DDP averages the
    # ranks' gradients in a different summation order: weights agree to rounding).
    assert a["splits"] == b["splits"]
    for part in ("baseline", "result"):
        for key, n in (("accuracy", 16), ("test_accuracy", 16)):
            assert abs(a[part][key] - b[part][key]) <= 1 / n + 1e-9, (part, key)
    assert a["baseline"]["accuracy"] == b["baseline"]["accuracy"]  # given weights: equal
    sa = torch.load(tmp_path / "one" / ".state" / "final.pt")["state_dict"]
    sb = torch.load(tmp_path / "two" / ".state" / "final.pt")["state_dict"]
    for k in sa:
        assert torch.allclose(sa[k], sb[k], rtol=1e-4, atol=1e-5), k
