"""The three data roles in `graphsearch optimize`: the test split never reaches a search
method (nor any training), it is measured once at the end, and the report says which split
each accuracy is on and whether the held-out splits look unseen by the baseline."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch

from graphsearch import data as data_mod
from graphsearch.methods import METHODS
from graphsearch.methods.base import Method, Proposal
from graphsearch.optimize import OptimizeConfig, optimize
from graphsearch.report import split_check

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = Path(__file__).parent / "tiny_model.py"


def _hashes(images: torch.Tensor) -> set[bytes]:
    return {hashlib.blake2b(x.numpy().tobytes(), digest_size=16).digest() for x in images}


class Probe(Method):
    """A search method that trains and evaluates through the context like the real ones, and
    also goes looking for data: it records what `ctx.data` offers."""

    name = "probe"
    summary = "records the data it can reach"
    cost = "a short training"
    trains = True
    defaults: dict = {}
    seen: dict = {}

    def search(self, ctx):
        Probe.seen["has_test"] = hasattr(ctx.data, "test")
        Probe.seen["datasets"] = [v for v in vars(ctx.data).values()
                                  if isinstance(v, torch.utils.data.Dataset)]
        Probe.seen["stage"] = "search"
        ctx.train(ctx.model, 0.5, "probe")
        ctx.evaluate(ctx.model)
        Probe.seen["stage"] = "after"
        return Proposal(ctx.land_widths({}), ctx.model.state_dict(), {})


@pytest.fixture
def recorded(monkeypatch, tmp_path):
    """Run optimize in-process with the probe; record every batch any dataset hands out."""
    calls, bundles = [], []
    real_get_batch = data_mod.ImageTensorDataset.get_batch
    real_load = data_mod.load_dataset

    def get_batch(self, indices, **kw):
        calls.append((Probe.seen.get("stage", "before"), self,
                      torch.as_tensor(indices, dtype=torch.long).clone()))
        return real_get_batch(self, indices, **kw)

    def load(*a, **kw):
        bundles.append(real_load(*a, **kw))
        return bundles[-1]

    monkeypatch.setattr(data_mod.ImageTensorDataset, "get_batch", get_batch)
    monkeypatch.setattr(data_mod, "load_dataset", load)
    monkeypatch.setitem(METHODS, "probe", Probe)
    monkeypatch.setattr(Probe, "seen", {})

    def run(**kw):
        cfg = OptimizeConfig(model=str(TINY), method="probe", data="synthetic:240:4",
                             baseline_epochs=1, finetune_epochs=1, search_epochs=0.5,
                             batch_size=60, out=str(tmp_path / "out"), progress=False, **kw)
        report = optimize(cfg, log=lambda *_: None)
        return report, bundles[-1], calls

    return run


@pytest.mark.parametrize("own_test", [False, True], ids=["held-out", "test-data"])
def test_test_split_never_reaches_a_method(recorded, own_test):
    kw = {"test_data": "synthetic:80:4"} if own_test else {}
    report, bundle, calls = recorded(**kw)
    test = bundle.test
    assert test is not None and len(test) == (80 if own_test else 24)
    assert Probe.seen["has_test"] is False
    assert all(ds is not test for ds in Probe.seen["datasets"])
    test_images = _hashes(test.images)
    # No batch handed out during the search (or the baseline's training) holds a test image.
    for stage, ds, idx in calls:
        if stage in ("before", "search"):
            assert ds is not test
            assert not (_hashes(ds.images[idx]) & test_images)
    # The test split is read at the end only: the baseline and the result, once each.
    test_reads = [(stage, idx) for stage, ds, idx in calls if ds is test]
    assert {s for s, _ in test_reads} == {"after"}
    assert sorted(torch.cat([i for _, i in test_reads]).tolist()) == \
        sorted(list(range(len(test))) * 2)
    # Every decision-side split is disjoint from the test split.
    assert not (_hashes(bundle.train.images) & test_images)
    assert not (_hashes(bundle.val.images) & test_images)
    b, r = report["baseline"], report["result"]
    assert report["accuracy_split"] == "validation"
    assert b["accuracy"] == b["val_accuracy"] and r["accuracy"] == r["val_accuracy"]
    for x in (b, r):
        assert 0.0 <= x["test_accuracy"] <= 1.0
    assert report["splits"]["test"]["images"] == len(test)
    assert report["splits"]["validation"]["images"] == len(bundle.val)


def test_report_fields_and_markdown(recorded):
    report, bundle, _ = recorded(val_data="synthetic:40:4", test_data="synthetic:60:4")
    s = report["splits"]
    assert (s["train"]["images"], s["validation"]["images"], s["test"]["images"]) == (240, 40, 60)
    assert s["validation"]["source"] == "synthetic:40:4"
    assert s["test"]["source"] == "synthetic:60:4"
    assert "reported only" in s["test"]["use"] and "every decision" in s["validation"]["use"]
    assert report["baseline"]["train_accuracy"] is not None
    assert report["split_check"]["comparisons"][0]["what"] == "validation - test"


def test_saved_report_says_which_split(tmp_path, recorded):
    report, _, _ = recorded()
    md = (tmp_path / "out" / "report.md").read_text()
    saved = json.loads((tmp_path / "out" / "report.json").read_text())
    assert saved["baseline"]["test_accuracy"] == report["baseline"]["test_accuracy"]
    assert "| | top-1 test | top-1 validation |" in md
    assert ("- test: 24 images (10% of --data), 0.1 of each class of synthetic:240:4, "
            "held out by seed 0") in md
    assert "Check that the held-out splits are unseen" in md
    _check_baseline_onnx(tmp_path)  # the same run: baseline.onnx has the baseline's weights


def test_no_test_split_reports_none(recorded):
    report, bundle, _ = recorded(test_fraction=0.0)
    assert bundle.test is None
    assert report["baseline"]["test_accuracy"] is None
    assert report["result"]["test_accuracy"] is None


# ------------------------------------------------------------------ the seen-split check


PRE = {"num_val": 5000, "num_test": 10000, "val_fraction": 0.1, "test_fraction": 0.0}


def test_validation_far_above_test_is_flagged():
    # The case: weights trained on all of the training data, 90.34% on the
    # validation split held out of it, 85.57% on the official test split.
    base = {"accuracy": 0.9034, "test_accuracy": 0.8557}
    c = split_check(base, PRE, 10, weights_given=True)
    assert c["comparisons"][0]["flagged"] and len(c["warnings"]) == 1
    assert "likely seen the validation split" in c["warnings"][0]
    # Two unseen samples of one accuracy differ by chance only: no warning.
    base = {"accuracy": 0.862, "test_accuracy": 0.8557}
    assert split_check(base, PRE, 10, weights_given=True)["warnings"] == []
    # On small splits, the same 1.5-point lead is chance.
    small = {**PRE, "num_val": 200, "num_test": 200}
    base = {"accuracy": 0.87, "test_accuracy": 0.8557}
    assert split_check(base, small, 10, weights_given=True)["warnings"] == []


def test_no_gap_to_training_images_is_flagged_for_given_weights():
    pre = {**PRE, "test_fraction": 0.1}
    seen = {"accuracy": 0.9034, "test_accuracy": 0.9010, "train_accuracy": 0.9050,
            "train_accuracy_images": 5000}
    c = split_check(seen, pre, 10, weights_given=True)
    assert [x["what"] for x in c["comparisons"] if x["flagged"]] == \
        ["training images - validation", "training images - test"]
    assert all("no generalisation gap" in w for w in c["warnings"])
    # A real generalisation gap: unseen. Weights trained here: nothing to suspect.
    unseen = {**seen, "train_accuracy": 0.99}
    assert split_check(unseen, pre, 10, weights_given=True)["warnings"] == []
    assert split_check(seen, pre, 10, weights_given=False)["warnings"] == []
    # A model at chance has no gap either; that is not evidence of anything.
    chance = {"accuracy": 0.1, "test_accuracy": 0.1, "train_accuracy": 0.1,
              "train_accuracy_images": 5000}
    assert split_check(chance, pre, 10, weights_given=True)["warnings"] == []


def _check_baseline_onnx(tmp_path):
    """`.state/baseline.onnx` is the baseline, not the model the search trained (the probe
    trains during the search, so the two differ)."""
    import onnxruntime as ort

    from graphsearch.load import load_model

    state = tmp_path / "out" / ".state"
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    sess = ort.InferenceSession(str(state / "baseline.onnx"), providers=["CPUExecutionProvider"])
    got = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]
    model = load_model(str(TINY)).model.eval()
    model.load_state_dict(torch.load(state / "baseline.pt")["state_dict"])
    searched = load_model(str(TINY)).model.eval()
    searched.load_state_dict(torch.load(state / "proposal.pt", weights_only=False)["state_dict"])
    with torch.no_grad():
        want, other = model(x).numpy(), searched(x).numpy()
    assert abs(want - other).max() > 1e-3  # the search did change the weights
    assert abs(got - want).max() < 1e-4
