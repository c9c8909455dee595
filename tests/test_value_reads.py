"""Models whose forward reads tensor values into Python (`if x.sum().item() > 0`,
`int(x.max())`): no meta tensor has a value, so the shapes come from one real pass, which
notes who reads (`graph.value_reads`). `inspect` works and says so; `optimize` and `export`
refuse such a model with one line naming the module and what to do when the exporters cannot
follow it (before any training, for optimize), never with a traceback."""

import subprocess
import sys

import pytest
import torch
from torch import nn

import graphsearch
from graphsearch.cli import main
from graphsearch.passes.mask import mask, verify
from graphsearch.passes.slim import slim
from graphsearch.trace import TraceFailure

pytestmark = pytest.mark.usefixtures("one_thread")

# The smallest model file: a leaf that fx cannot trace (an `if` on a tensor's value).
LEAF = """
    import torch
    from torch import nn


    class Gate(nn.Module):
        def forward(self, x):
            if x.sum().item() > 0:
                return torch.relu(x)
            return x


    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3, padding=1)
            self.gate = Gate()
            self.conv2 = nn.Conv2d(4, 4, 1)
            self.fc = nn.Linear(4, 4)

        def forward(self, x):
            return self.fc(torch.relu(self.conv2(self.gate(self.conv(x)))).mean((2, 3)))


    def build_model():
        return Net()


    def example_inputs():
        return (torch.randn(1, 3, 32, 32),)
"""
TOP_LEVEL = LEAF.replace("return self.fc(torch.relu(self.conv2(self.gate(self.conv(x)))).mean((2, 3)))",
                         "x = self.conv(x)\n"
                         "            if x.sum().item() > 0:\n"
                         "                x = torch.relu(x)\n"
                         "            return self.fc(self.conv2(x).mean((2, 3)))")


class Gate(nn.Module):
    def forward(self, x):
        return torch.relu(x) if x.sum().item() > 0 else x


class Crop(nn.Module):  # a size read from values: int() of a tensor
    def forward(self, x):
        n = int(x.abs().max() >= 0) * 4
        return x[:, :, :n, :n]


class ToList(nn.Module):  # tolist() reads values without aten._local_scalar_dense
    def forward(self, x):
        return x * (2.0 if x.mean((0, 2, 3)).tolist()[0] > -1e9 else 1.0)


class Net(nn.Module):
    def __init__(self, body=None):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.body = body
        self.conv2 = nn.Conv2d(4, 4, 1)
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        x = self.conv(x)
        if self.body is None:  # top level: a read that fx traces (a node `item`)
            x = x / (x.abs().max().item() + 1)
        else:
            x = self.body(x)
        return self.fc(torch.relu(self.conv2(x)).mean((2, 3)))


X = (torch.randn(1, 3, 8, 8),)


@pytest.mark.parametrize("body,who", [
    (Gate, "submodule 'body' (Gate)"), (Crop, "submodule 'body' (Crop)"),
    (ToList, "submodule 'body' (ToList)"), (None, "node 'item' (item) of the model's forward"),
])
def test_the_analysis_runs_and_names_who_reads_values(body, who):
    torch.manual_seed(0)
    model = Net(body() if body else None).eval()
    g = graphsearch.analyze(model, X)
    assert g.shape_mode == "real"
    assert set(g.value_reads.values()) == {who}
    assert g.summary()["value_reads"] == [who]
    # the rest of the model still prunes: slim == mask, params == the cost model's
    c2 = next(grp for grp in g.prunable_groups if "conv2.weight[out]" in grp.members)
    keep = {c2.id: [0, 2]}
    s = slim(g, keep)
    assert verify(s, mask(g, keep), (torch.randn(2, 3, 8, 8),)).ok
    assert sum(p.numel() for p in s.parameters()) == g.cost(keep).params < g.baseline.params


def test_no_value_reads_on_meta():
    g = graphsearch.analyze(Net(nn.ReLU()).eval(), X)
    assert g.shape_mode == "meta" and g.value_reads == {}


class Broken(nn.Module):
    def __init__(self):
        super().__init__()
        self.gate = Gate()
        self.conv = nn.Conv2d(4, 4, 1)  # the example input has 3 channels

    def forward(self, x):
        return self.conv(self.gate(x))


def test_a_model_that_does_not_run_on_its_inputs_is_a_trace_failure():
    # the meta pass fails (.item()), then the real pass too: one message, not the meta error
    with pytest.raises(TraceFailure, match="Broken does not run on its example inputs "
                                           r"\(RuntimeError: .*\); check example_inputs\(\)"):
        graphsearch.analyze(Broken(), X)


def test_inspect_works_and_notes_the_value_read(write_model, capsys):
    path = write_model(LEAF)
    assert main(["inspect", str(path)]) == 0
    out, err = capsys.readouterr()
    assert "note: submodule 'gate' (Gate) reads tensor values" in err
    assert "shapes     from one real forward pass" in out
    assert "groups     5 (1 prunable" in out  # conv2's channels


def test_optimize_refuses_before_training_with_one_line(write_model, tmp_path, capsys):
    path = write_model(LEAF)
    out = tmp_path / "out"
    code = main(["optimize", str(path), "--data", "synthetic:40:4", "--out", str(out),
                 "--round-to", "1", "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    line = err.strip().splitlines()[-1]
    assert line.startswith("graphsearch: error: submodule 'gate' (Gate) reads tensor values")
    assert "cannot be exported to model.onnx / model.pt2" in line and "torch.where" in line
    assert not out.exists()  # refused before any training or file


def test_export_and_top_level_reads_are_one_line_errors(write_model, tmp_path):
    """In a real process: what a user sees (exit status 2, no traceback)."""
    keep = tmp_path / "keep.json"
    keep.write_text("{}")
    leaf, top = write_model(LEAF, "leaf.py"), write_model(TOP_LEVEL, "top.py")
    for argv, expected in (
            (["export", leaf, "--keep", keep, "--out", tmp_path / "e"],
             "submodule 'gate' (Gate) reads tensor values"),
            (["inspect", top], "torch.fx could not trace Net: ")):
        r = subprocess.run([sys.executable, "-m", "graphsearch.cli", *map(str, argv)],
                           capture_output=True, text=True, timeout=300)
        assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-2000:]
        assert r.stderr.strip().splitlines()[-1].startswith("graphsearch: error: " + expected)
    assert "torch.where" in r.stderr


class _GatedConv(nn.Module):
    """The issue's block: its conv runs only when the input's mean is positive, so a count on
    zeros (what the analysis runs an opaque op on) misses it."""

    def __init__(self, c):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x):
        if x.mean() > 0:
            return x + self.conv(x)
        return x


class _Gated(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 32, 3, padding=1)
        self.gate = _GatedConv(32)
        self.head = nn.Conv2d(32, 16, 3, padding=1)
        self.fc = nn.Linear(16, 10)

    def forward(self, x):
        x = self.gate(torch.relu(self.stem(x)))
        return self.fc(torch.relu(self.head(x)).mean((2, 3)))


@pytest.mark.parametrize("batch", [1, 3])
def test_an_opaque_module_that_reads_values_is_costed_on_the_examples_branch(batch):
    """Counted for real in the real pass on the example inputs: the cost model's MACs equal
    torch's FLOP counter on the model, and the unprunable share says what a plan cannot
    change (the issue: 5.6 M MACs and 84% prunable before, 15.0 M and 31% in truth)."""
    from torch.utils.flop_counter import FlopCounterMode

    model = _Gated().eval()
    x = torch.randn(batch, 3, 32, 32)
    g = graphsearch.analyze(model, (x,))
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(x)
    assert g.cost().macs == counter.get_total_flops() // 2 // batch == 15_040_672
    share = g.mac_share()
    assert share["share"] == pytest.approx(4_718_752 / 15_040_672)
    assert "'gate' is opaque" in share["reasons"][0][0]
    # the gate's conv (32 -> 32, 3x3, 32x32) and the stem, whose channels enter the gate
    assert share["reasons"][0][1] == 32 * 32 * 9 * 32 * 32 + 3 * 9 * 32 * 32 * 32
    stem = next(grp for grp in g.groups if "stem.weight[out]" in grp.members)
    assert not stem.prunable
    # a plan changes what it can: half the head's channels halve its conv and the linear
    head = next(grp for grp in g.groups if "head.weight[out]" in grp.members)
    assert g.cost().macs - g.cost({head.id: head.size // 2}).macs == \
        (32 * 9 * 16 * 32 * 32 + 16 * 10) // 2
