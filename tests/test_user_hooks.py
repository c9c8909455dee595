"""model.py's optional hooks: `datasets()`, `loss_fn` and `evaluate` are what `optimize`
trains on, trains with and decides and reports by (examples/text_classifier.py: token ids in,
macro F1 out)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch.utils.data import TensorDataset

from graphsearch import optimize as optimize_mod
from graphsearch.data import UserDataset, user_datasets
from graphsearch.load import UserError, load_model
from graphsearch.optimize import OptimizeConfig, optimize
from graphsearch.train import evaluate

pytestmark = pytest.mark.usefixtures("one_thread")

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "text_classifier.py"


def test_text_classifier_end_to_end_with_its_own_data_loss_and_metric(tmp_path, monkeypatch):
    calls = {"loss": 0, "evaluate": 0}
    real_load = optimize_mod.load_model

    def load(*a, **kw):
        loaded = real_load(*a, **kw)
        loss, metric = loaded.loss_fn, loaded.evaluate

        def counted_loss(out, y):
            calls["loss"] += 1
            return loss(out, y)

        def counted_metric(model, ds):
            calls["evaluate"] += 1
            return metric(model, ds)

        loaded.loss_fn, loaded.evaluate = counted_loss, counted_metric
        return loaded

    monkeypatch.setattr(optimize_mod, "load_model", load)
    out = tmp_path / "out"
    cfg = OptimizeConfig(model=str(EXAMPLE), method="magnitude", flops="0.5",
                         baseline_epochs=1, search_epochs=0.5, finetune_epochs=1,
                         batch_size=100, out=str(out), progress=False)
    report = optimize(cfg, log=lambda *_: None)
    # 20 steps a baseline epoch + 20 fine-tuning: every training step used the model's loss.
    assert calls["loss"] >= 40
    # Validation of the baseline, after each epoch, before/after fine-tuning, test twice...
    assert calls["evaluate"] >= 6
    assert report["metric"] == "evaluate() of model.py"
    assert report["preprocessing"]["loss"] == "loss_fn() of model.py"
    s = report["splits"]
    assert (s["train"]["images"], s["validation"]["images"], s["test"]["images"]) == \
        (2000, 400, 400)
    assert s["test"]["source"] == "datasets()['test'] of model.py"
    assert report["split_check"]["warnings"] == []  # not a proportion: not checked
    # The reported test figure is the example's macro F1 of the exported model, not top-1.
    loaded = real_load(str(EXAMPLE))
    test = loaded.namespace.datasets()["test"]
    slim = torch.export.load(str(out / "model.pt2")).module()
    f1 = loaded.evaluate(slim, test)
    assert report["result"]["test_accuracy"] == pytest.approx(f1, abs=1e-6)
    x, y = test.tensors
    with torch.no_grad():
        top1 = (slim(x).argmax(1) == y).float().mean().item()
    assert f1 != pytest.approx(top1, abs=1e-9)  # the two metrics differ on this model
    assert report["result"]["flops"] <= report["targets"][0]["limit"]
    md = (out / "report.md").read_text()
    assert "| | metric test | metric validation |" in md
    assert "metric: evaluate() of model.py" in md


def _xy(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return TensorDataset(torch.randn(n, 3, generator=g), torch.randint(0, 2, (n,), generator=g))


def test_user_datasets_hold_out_missing_splits_by_seed():
    train = _xy(100)
    b = user_datasets(lambda: {"train": train}, val_fraction=0.1, test_fraction=0.2, seed=3)
    assert (len(b.train), len(b.val), len(b.test)) == (70, 10, 20)
    idx = [set(ds.base.indices) for ds in (b.train, b.val, b.test)]
    assert not (idx[0] & idx[1] or idx[0] & idx[2] or idx[1] & idx[2])
    assert "held out at random by seed 3" in b.preprocessing["test_source"]
    again = user_datasets(lambda: (train,), val_fraction=0.1, test_fraction=0.2, seed=3)
    assert set(again.test.base.indices) == idx[2]
    assert not hasattr(b.for_search(), "test")
    given = user_datasets(lambda: (train, _xy(7, 1), _xy(9, 2)), test_fraction=0.2)
    assert (len(given.train), len(given.val), len(given.test)) == (100, 7, 9)


@pytest.mark.parametrize("returned,words", [
    (lambda: 5, "must return"),
    (lambda: {"train": _xy(10), "dev": _xy(3)}, "unknown splits ['dev']"),
    (lambda: {"train": _xy(10), "val": 3}, "not a map-style dataset"),
    (lambda: 1 / 0, "datasets() in model.py failed: ZeroDivisionError"),
])
def test_bad_datasets_hook(returned, words):
    with pytest.raises(UserError) as exc:
        user_datasets(returned)
    assert words in str(exc.value)


def test_metric_must_be_a_number():
    ds = UserDataset(_xy(10), metric=lambda model, d: "good")
    with pytest.raises(UserError, match="evaluate\\(\\) in model.py returned str"):
        evaluate(torch.nn.Linear(3, 2), ds)


def test_hooks_are_functions(write_model):
    path = write_model("import torch\nloss_fn = 3\n"
                       "def build_model():\n    return torch.nn.Linear(2, 2)\n")
    with pytest.raises(UserError, match="'loss_fn' in .* must be a function"):
        load_model(str(path))
