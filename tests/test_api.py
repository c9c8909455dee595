"""The Python API, `graphsearch.optimize(model, example_inputs, ...)`: the CLI's pipeline on
a model in memory, the model pruned in place.

The main check: the same tiny model and synthetic data through `graphsearch optimize
model.py` and through the API, same seed, give the same plan, widths, costs and accuracies;
and the API's model is the user's object, pruned, computing what the CLI's model.pt2
computes.
"""

from __future__ import annotations

import importlib.util
import json
import sys

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

import graphsearch
from graphsearch.cli import main
from graphsearch.inplace import InPlaceError
from graphsearch.load import UserError

pytestmark = pytest.mark.usefixtures("one_thread")

MODEL_PY = """
import torch
from torch import nn
from torch.utils.data import TensorDataset


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 16, 3, padding=1, bias=False)
        self.b1 = nn.BatchNorm2d(16)
        self.c2 = nn.Conv2d(16, 16, 3, padding=1)
        self.c3 = nn.Conv2d(16, 24, 3, stride=2, padding=1)
        self.fc = nn.Linear(24, 4)

    def forward(self, x):
        x = torch.relu(self.b1(self.c1(x)))
        x = x + torch.relu(self.c2(x))
        return self.fc(torch.relu(self.c3(x)).mean((2, 3)))

    def describe(self):
        return f"{self.c1.out_channels}-{self.c3.out_channels}"


def build_model():
    torch.manual_seed(0)
    return Net()


def example_inputs():
    return (torch.zeros(1, 3, 8, 8),)


def datasets():
    g = torch.Generator().manual_seed(1)
    y = torch.randint(0, 4, (240,), generator=g)
    x = torch.randn(240, 3, 8, 8, generator=g) * 0.5
    x[:, 0] += y.float().view(-1, 1, 1)  # a learnable signal: the class shifts one channel
    return {"train": TensorDataset(x[:160], y[:160]), "val": TensorDataset(x[160:200], y[160:200]),
            "test": TensorDataset(x[200:], y[200:])}
"""

SETTINGS = {"method": "magnitude", "flops": "0.5", "round_to": 1, "baseline_epochs": 1,
            "search_epochs": 0.5, "finetune_epochs": 1, "batch_size": 32, "latency_batch": 1,
            "seed": 3}


def cli_args(path, out) -> list[str]:
    args = ["optimize", str(path), "--out", str(out), "--quiet"]
    for k, v in SETTINGS.items():
        args += [f"--{k.replace('_', '-')}", str(v)]
    return args


def user_module(path):
    spec = importlib.util.spec_from_file_location("graphsearch_test_api_model", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def both(tmp_path_factory):
    """The CLI's run and the API's run of the same model.py, data and settings."""
    tmp = tmp_path_factory.mktemp("api")
    path = tmp / "model.py"
    path.write_text(MODEL_PY)
    assert main(cli_args(path, tmp / "cli")) == 0
    cli = json.loads((tmp / "cli" / "report.json").read_text())
    mod = user_module(path)
    model = mod.build_model()
    splits = mod.datasets()
    result = graphsearch.optimize(model, mod.example_inputs(), train=splits["train"],
                                  val=splits["val"], test=splits["test"], out=tmp / "api",
                                  progress=False, **SETTINGS)
    return {"tmp": tmp, "cli": cli, "result": result, "model": model, "mod": mod}


def test_api_equals_cli_for_the_same_seed(both):
    cli, api = both["cli"], both["result"].report
    assert api["widths"] == cli["widths"]
    assert both["result"].plan.keep  # the plan prunes something
    for side in ("baseline", "result"):
        for key in ("flops", "macs", "params", "accuracy", "test_accuracy",
                    "accuracy_before_finetune"):
            if key in cli[side]:
                assert api[side][key] == cli[side][key], (side, key)
    assert api["result"]["flops"] <= 0.5 * api["baseline"]["flops"]
    assert api["method"] == cli["method"] == "magnitude"


def test_api_prunes_the_users_model_in_place(both):
    r, model = both["result"], both["model"]
    assert r.in_place and r.model is model and type(model).__name__ == "Net"
    assert sum(p.numel() for p in model.parameters()) == r.report["result"]["params"]
    assert model.describe() != "16-24"  # its own method sees the new widths
    x = torch.randn(3, 3, 8, 8)
    exported = torch.export.load(str(both["tmp"] / "cli" / "model.pt2")).module()
    with torch.no_grad():  # the fine-tuned weights: what the CLI exported, bit for bit close
        torch.testing.assert_close(model.eval()(x), exported(x), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(model(x), r.slim.eval()(x), rtol=1e-5, atol=1e-6)
    assert set(r.paths) == {"model.onnx", "model.pt2", "report.json", "report.md"}
    assert all(p.exists() for p in r.paths.values())


def test_api_without_out_writes_nothing_and_refuses_what_in_place_cannot_do(tmp_path,
                                                                           monkeypatch):
    """A size written in the forward: the pipeline's result is the slim module, a warning
    says why, and the user's model keeps its architecture. No `out`: nothing written here."""

    class Flat(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 8, 3, padding=1)
            self.fc = nn.Linear(8 * 2 * 2, 4)

        def forward(self, x):
            return self.fc(nn.functional.adaptive_avg_pool2d(self.conv(x), 2).view(-1, 32))

    monkeypatch.chdir(tmp_path)
    g = torch.Generator().manual_seed(0)
    train = TensorDataset(torch.randn(64, 3, 8, 8, generator=g), torch.randint(0, 4, (64,),
                                                                             generator=g))
    model = Flat()
    with pytest.warns(UserWarning, match=r"view.*\(-1, 32\)"):
        r = graphsearch.optimize(model, torch.zeros(1, 3, 8, 8), train=train, flops=0.5,
                                 round_to=1, baseline_epochs=1, finetune_epochs=0,
                                 latency_batch=1, progress=False)
    assert not r.in_place and r.model is r.slim and "view" in r.note
    assert model.conv.out_channels == 8 and r.paths == {}
    assert r.report["result"]["flops"] <= 0.5 * r.report["baseline"]["flops"]
    assert list(tmp_path.iterdir()) == []


def test_api_refuses_bad_arguments():
    with pytest.raises(UserError, match="not a torch.nn.Module"):
        graphsearch.optimize("model.py", torch.zeros(1, 3))
    with pytest.raises(UserError, match="unknown options"):
        graphsearch.optimize(nn.Linear(3, 2), torch.zeros(1, 3), epochs=3)
    with pytest.raises(UserError, match="not a map-style"):
        graphsearch.optimize(nn.Linear(3, 2), torch.zeros(1, 3), train=iter([]))
    assert issubclass(InPlaceError, UserError)
    assert graphsearch.UserError is UserError  # catchable from the package itself


def test_analyze_and_prune_refuse_what_they_cannot_take():
    """The bugs: `analyze("model.py", ...)` died in an AttributeError ('str' object has no
    attribute 'training'), `prune(model, graph, {gid: 3})` (a width, not indices) in a
    TypeError deep in the slim pass."""
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.ReLU(), nn.Conv2d(4, 2, 1))
    with pytest.raises(UserError, match="analyze: the model is a str, not a torch.nn.Module"):
        graphsearch.analyze("model.py", (torch.zeros(1, 3, 4, 4),))
    graph = graphsearch.analyze(model, (torch.zeros(1, 3, 4, 4),))
    gid = graph.prunable_groups[0].id
    before = [p.clone() for p in model.parameters()]
    with pytest.raises(UserError, match=rf"prune: group {gid} is given 3; give the kept "
                                        r"channel indices \(list\(range\(3\)\)"):
        graphsearch.prune(model, graph, {gid: 3})
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert graphsearch.prune(model, graph, {gid: [0, 2]}).params < sum(p.numel() for p in before)


@pytest.mark.parametrize("settings,words", [
    ({"foo": 1}, "foo: not a setting of morphnet"),
    ({"cost_weight": "abc"}, "morphnet's cost_weight takes a number"),
    ({"cap": "False"}, "morphnet's cap takes true or false"),
    ({"repeats": 2.5}, "morphnet's repeats takes a whole number"),
    # a text setting's bad value was refused only when the search began, after the
    # baseline's training (`--set cost_per=bogus` after 6 epochs on the CLI)
    ({"combine": "mean"}, "morphnet's combine takes one of l2, max"),
])
def test_api_refuses_a_setting_the_method_lacks_or_of_the_wrong_kind(settings, words):
    # The bug: the API ran a misspelt setting silently with the default (only the CLI checked
    # names), and a value of the wrong kind ended in a traceback from float() or, for a
    # switch, in bool("False") = True.
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    train = TensorDataset(torch.randn(8, 3), torch.randint(0, 2, (8,)))
    with pytest.raises(UserError, match=words):
        graphsearch.optimize(model, torch.zeros(1, 3), train=train, method="morphnet",
                             settings=settings, baseline_epochs=0, finetune_epochs=0,
                             progress=False)


def test_a_model_object_is_the_trained_baseline_as_with_weights():
    """Bug: the API trained a model object's baseline for 6 more epochs by default (the CLI's
    default for an untrained model.py), so a user's trained model was changed before the
    search and the API's CIFAR run differed from the CLI's with `--weights`. A model object is
    now used as it is unless `baseline_epochs` asks for training."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(96, 3, 8, 8, generator=g)
    y = torch.randint(0, 4, (96,), generator=g)
    train, val = TensorDataset(x[:64], y[:64]), TensorDataset(x[64:], y[64:])
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    seen = []

    def evaluate(m, ds):
        seen.append({k: v.clone() for k, v in m.state_dict().items()})
        return 0.5
    r = graphsearch.optimize(model, torch.zeros(1, 3, 8, 8), train=train, val=val, flops=0.5,
                             round_to=1, finetune_epochs=0, latency_batch=1, progress=False,
                             evaluate=evaluate)
    assert r.report["epochs"]["baseline"] == 0
    assert all(torch.equal(seen[0][k], before[k]) for k in before)  # the baseline, untouched
    trained = graphsearch.optimize(
        nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                      nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4)),
        torch.zeros(1, 3, 8, 8), train=train, val=val, flops=0.5, round_to=1,
        baseline_epochs=1, finetune_epochs=0, latency_batch=1, progress=False)
    assert trained.report["epochs"]["baseline"] == 1
