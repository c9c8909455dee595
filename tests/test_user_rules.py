"""A user's rule for their own module reaches everything: `inspect`, `optimize` (through
model.py's `rules()` hook or `OptimizeConfig.rules`) and the methods' graph of the model
they train (`SearchContext.model_graph`)."""

import json
import os
import subprocess
import sys

import pytest
import torch

from graphsearch.analysis import analyze
from graphsearch.cli import main
from graphsearch.load import UserError, load_model
from graphsearch.methods.base import SearchContext

# A per-channel scale written as a loop over channels: fx cannot trace `range(proxy)`, so
# without a rule the block is an opaque leaf and the channels around it are not pruned.
MODEL = """
import torch
from torch import nn

from graphsearch.rules import Rule


class ChannelScale(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.scale = nn.Parameter(torch.linspace(0.5, 1.5, c))

    def forward(self, x):
        return torch.stack([x[:, i] * self.scale[i] for i in range(x.shape[1])], 1)


def channel_scale(ctx, node):
    line = ctx.line(ctx.ids(node.args[0]), 1, node.args[0])
    ctx.bind(f"{node.target}.scale", 0, line, role="gamma")
    return ctx.channel_ids(line, node)


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 16, 3, padding=1, bias=False)
        self.b1 = nn.BatchNorm2d(16)
        self.scale = ChannelScale(16)
        self.c2 = nn.Conv2d(16, 16, 3, stride=2, padding=1, bias=False)
        self.b2 = nn.BatchNorm2d(16)
        self.fc = nn.Linear(16, 4)

    def forward(self, x):
        x = self.scale(torch.relu(self.b1(self.c1(x))))
        x = torch.relu(self.b2(self.c2(x)))
        return self.fc(x.mean((2, 3)))


def build_model():
    torch.manual_seed(0)
    return Net()


def example_inputs():
    return (torch.zeros(1, 3, 32, 32),)
"""
HOOK = """

def rules():
    return {ChannelScale: Rule("channel_scale", channel_scale)}
"""


def scale_group(graph):
    return next(g for g in graph.groups if "scale.scale" in g.members or
                "c1.weight[out]" in g.members)


@pytest.fixture
def with_hook(write_model):
    return write_model(MODEL + HOOK)


def test_without_a_rule_the_block_is_opaque(write_model):
    loaded = load_model(str(write_model(MODEL)))
    assert loaded.rules is None
    with pytest.warns(UserWarning, match="submodule 'scale' could not be traced"):
        g = analyze(loaded.model, loaded.example_inputs)
    assert not scale_group(g).prunable


def test_inspect_uses_the_hooks_rules(with_hook, capsys):
    assert main(["inspect", str(with_hook), "--json"]) == 0
    groups = json.loads(capsys.readouterr().out)["groups"]
    mine = next(g for g in groups if "scale.scale" in g["members"])
    assert mine["prunable"] and "c1.weight[out]" in mine["members"]


def test_the_methods_graph_uses_the_search_graphs_rules(with_hook):
    loaded = load_model(str(with_hook))
    graph = analyze(loaded.model, loaded.example_inputs, rules=loaded.rules)
    ctx = SearchContext(graph=graph, model=loaded.model, data=None, constraints=[],
                        round_to=1, settings={}, epochs=0.0, lr=0.1, batch_size=1, seed=0,
                        state_dir=None, example_inputs=loaded.example_inputs)
    mg = ctx.model_graph()
    assert mg.rules is graph.rules
    assert scale_group(mg).prunable and "scale.scale" in scale_group(mg).members


@pytest.mark.parametrize("returned, words", [
    ("3", "must return a graphsearch.rules.Rules or a mapping"),
    ("{torch.nn.Conv2d: Rule('mine', channel_scale)}", "already has the rule 'conv'"),
])
def test_a_bad_rules_hook_is_one_user_error(write_model, returned, words):
    path = write_model(MODEL + f"\n\ndef rules():\n    return {returned}\n")
    with pytest.raises(UserError, match=words):
        load_model(str(path))


def test_optimize_from_the_cli_prunes_the_users_block(with_hook, tmp_path):
    out = tmp_path / "out"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "GRAPHSEARCH_CACHE": "/tmp/graphsearch-test"}
    r = subprocess.run(
        [sys.executable, "-m", "graphsearch.cli", "optimize", str(with_hook), "--method",
         "uniform", "--flops", "0.5", "--round-to", "4", "--out", str(out), "--data",
         "synthetic:240:4", "--baseline-epochs", "1", "--finetune-epochs", "1",
         "--search-epochs", "0.5", "--batch-size", "60", "--quiet"],
        capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stderr
    report = json.loads((out / "report.json").read_text())
    mine = next(w for w in report["widths"].values() if "scale.scale" in w["members"] or
                "c1.weight[out]" in w["members"])
    assert mine["size"] == 16 and 0 < mine["width"] < 16
    assert report["result"]["flops"] <= report["targets"][0]["limit"]
    slim = torch.export.load(str(out / "model.pt2")).module()
    assert slim(torch.zeros(2, 3, 32, 32)).shape == (2, 4)
