"""`graphsearch inspect`: zoo models, a user's model.py, and one-line errors (exit status 2)."""

import json
import re
import subprocess
import sys

import pytest
import torch

from graphsearch import zoo
from graphsearch.cli import main

TINY = """
    import torch
    from torch import nn


    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1 = nn.Conv2d(3, 4, 3, padding=1)
            self.conv2 = nn.Conv2d(4, 2, 1)

        def forward(self, x):
            return self.conv2(torch.relu(self.conv1(x)))


    def build_model():
        return Net()
"""
WITH_INPUTS = TINY + """

    def example_inputs():
        return (torch.randn(1, 3, 8, 8),)
"""
# conv1: 64 positions x 9 x 3 x 4, conv2: 64 x 4 x 2; params 3*9*4 + 4 + 4*2 + 2.
TINY_MACS, TINY_PARAMS = 64 * (9 * 3 * 4 + 4 * 2), 3 * 9 * 4 + 4 + 4 * 2 + 2


def cli(*argv):
    """Run `graphsearch` in a fresh interpreter: what a user sees, tracebacks included."""
    return subprocess.run([sys.executable, "-m", "graphsearch.cli", *map(str, argv)],
                          capture_output=True, text=True, timeout=120)


def test_inspect_zoo_model_text(capsys):
    assert main(["inspect", "zoo:resnet20"]) == 0
    out, err = capsys.readouterr()
    assert err == ""
    lines = out.splitlines()
    assert lines[0].split() == ["id", "size", "prunable", "members", "/", "why", "not"]
    assert lines[1].split()[:4] == ["0", "3", "no", "model"]  # the input, with its reason
    assert "yes, >=0" in out
    assert "model      zoo:resnet20" in lines
    assert "MACs       40.813 M  (40,813,184)" in lines
    assert "params     272.474 k  (272,474)" in lines
    assert any(line.startswith("groups     14 (12 prunable, 9 may reach width 0") for line in lines)


def test_inspect_zoo_model_json_subprocess():
    r = cli("inspect", "zoo:vit_tiny", "--json")
    assert r.returncode == 0, r.stderr
    data = json.loads(r.stdout)
    entry = zoo.MODELS["vit_tiny"]
    assert data["model"] == "zoo:vit_tiny" and data["notes"] == []
    s = data["summary"]
    assert (s["groups"], s["prunable"], s["removable"]) == (7, 5, 4)
    assert (s["macs"], s["flops"], s["params"]) == (entry.macs, 2 * entry.macs, entry.params)
    assert [g["size"] for g in data["groups"]] == [3, 48, 3, 192, 3, 192, 10]
    heads = data["groups"][2]
    assert heads["prunable"] and heads["removable"] and heads["min_width"] == 0
    assert heads["members"][0] == "blocks.0.attn.attn.in_proj_weight[out] x48"
    assert data["groups"][-1]["reason"] == "model output"


def test_inspect_model_file(write_model, capsys):
    path = write_model(WITH_INPUTS)
    assert main(["inspect", str(path)]) == 0
    out, err = capsys.readouterr()
    assert err == ""
    assert f"model      {path}" in out
    assert f"MACs       {TINY_MACS / 1e3:.3f} k  ({TINY_MACS:,})" in out
    assert f"({TINY_PARAMS:,})" in out
    assert "groups     3 (1 prunable, 0 may reach width 0, 4 prunable channels)" in out

    assert main(["inspect", str(path), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["model"] == str(path) and data["notes"] == []
    assert (data["summary"]["macs"], data["summary"]["params"]) == (TINY_MACS, TINY_PARAMS)
    assert [(g["size"], g["prunable"]) for g in data["groups"]] == [(3, False), (4, True), (2, False)]
    assert data["groups"][1]["members"] == ["conv1.weight[out]", "conv1.bias", "conv2.weight[in]"]


def test_inspect_folder_without_example_inputs_notes_the_default(write_model, capsys):
    path = write_model(TINY)
    assert main(["inspect", str(path.parent), "--json"]) == 0  # a folder means its model.py
    data = json.loads(capsys.readouterr().out)
    assert data["notes"] == ["no example_inputs() in model.py: using one input of shape (1, 3, 32, 32)"]
    assert data["summary"]["macs"] == TINY_MACS * 16  # 32x32 instead of 8x8
    assert main(["inspect", str(path)]) == 0
    assert capsys.readouterr().err.startswith("note: no example_inputs() in model.py")


def test_inspect_untraceable_submodule_is_a_note(write_model, capsys):
    path = write_model(WITH_INPUTS.replace(
        "return self.conv2(torch.relu(self.conv1(x)))",
        "return self.conv2(self.gate(self.conv1(x)))").replace(
        "self.conv2 = nn.Conv2d(4, 2, 1)", "self.conv2 = nn.Conv2d(4, 2, 1)\n"
        "            self.gate = Gate()").replace(
        "class Net(nn.Module):", "class Gate(nn.Module):\n"
        "        def forward(self, x):\n"
        "            return x.relu() if x.sum() > 0 else -x\n\n\n"
        "    class Net(nn.Module):"))
    assert main(["inspect", str(path), "--all-members"]) == 0
    out, err = capsys.readouterr()
    assert err.startswith("note: graphsearch: submodule 'gate' could not be traced by torch.fx")
    assert "submodule 'gate' is opaque" in out
    assert "groups     4 (0 prunable" in out


BROKEN = {
    "syntax_error": ("def build_model(:\n    pass\n",
                     "could not import '{path}': SyntaxError"),
    "no_build_model": ("import torch\nMODEL = torch.nn.Linear(2, 2)\n",
                       "'{path}' must define build_model() returning a torch.nn.Module"),
    "build_fails": ("def build_model():\n    raise RuntimeError('no GPU here')\n",
                    "build_model() in '{path}' failed: RuntimeError: no GPU here"),
    "not_a_module": ("def build_model():\n    return 42\n",
                     "build_model() in '{path}' returned int, not a torch.nn.Module"),
    "untraceable_forward": (WITH_INPUTS.replace(
        "return self.conv2(torch.relu(self.conv1(x)))",
        "return self.conv2(x) if x.sum() > 0 else x"), "torch.fx could not trace Net: "),
}


def _one_line_error(code, err, expected):
    assert code == 2
    lines = err.splitlines()
    assert len(lines) == 1 and "Traceback" not in err
    assert lines[0].startswith("graphsearch: error: " + expected)


@pytest.mark.parametrize("case", list(BROKEN))
def test_broken_model_file_is_one_line_error(case, write_model, capsys):
    source, expected = BROKEN[case]
    path = write_model(source)
    code = main(["inspect", str(path)])
    out, err = capsys.readouterr()
    assert out == ""
    _one_line_error(code, err, expected.format(path=path))


@pytest.mark.parametrize("argv,expected", [
    (["inspect", "no/such/model.py"], "model file 'no/such/model.py' does not exist; pass a model.py"),
    (["inspect", "zoo:resnet21"], "no zoo model 'resnet21'; choose one of: densenet121, "),
    (["inspect", "zoo:resnet20", "--weights", "missing.pt"], "weights file 'missing.pt' does not exist"),
])
def test_bad_arguments_are_one_line_errors(argv, expected, capsys):
    code = main(argv)
    out, err = capsys.readouterr()
    assert out == ""
    _one_line_error(code, err, expected)


@pytest.mark.parametrize("content,why", [(b"", "the file is empty"), (b"not a tensor", "")])
def test_unreadable_weights_say_why(tmp_path, capsys, content, why):
    """The bug: an empty weights file gave "could not read weights 'w.pt': " and nothing
    after the colon."""
    bad = tmp_path / "w.pt"
    bad.write_bytes(content)
    code = main(["inspect", "zoo:resnet20", "--weights", str(bad)])
    _, err = capsys.readouterr()
    _one_line_error(code, err, f"could not read weights '{bad}' ({why}")
    reason = re.search(r"could not read weights '.*?' \((.*?)\); pass a state dict saved "
                       r"with torch\.save", err)
    assert reason and reason.group(1).strip(), err


def test_errors_from_a_real_process_have_no_traceback(write_model):
    path = write_model(BROKEN["syntax_error"][0])
    for argv, expected in ((["inspect", path], f"could not import '{path}': SyntaxError"),
                           (["inspect", "zoo:nope"], "no zoo model 'nope'")):
        r = cli(*argv)
        assert r.stdout == ""
        _one_line_error(r.returncode, r.stderr, expected)


def test_optimize_defaults_come_from_optimize_config():
    import dataclasses

    from graphsearch.cli import build_parser
    from graphsearch.optimize import OptimizeConfig

    args = vars(build_parser().parse_args(["optimize"]))
    fields = {f.name: f.default for f in dataclasses.fields(OptimizeConfig)}
    shared = (set(args) & set(fields)) - {"model"}  # the CLI names an example model
    assert {"method", "seed", "lr", "finetune_lr", "batch_size", "val_fraction",
            "test_fraction", "baseline_epochs", "search_epochs", "finetune_epochs",
            "round_to", "out", "threads", "max_train"} <= shared
    for name in shared:
        assert args[name] == fields[name], name


def test_max_train_help_and_code_agree():
    """--max-train says it draws N at random by the seed, and it does (not the first N)."""
    from graphsearch.cli import build_parser
    from graphsearch.data import load_dataset
    from graphsearch.optimize import _limit_training

    opt = build_parser()._subparsers._group_actions[0].choices["optimize"]
    text = " ".join(opt.format_help().split())
    assert "train on N images of the training split drawn at random by --seed" in text
    bundle = load_dataset("synthetic:400:4", val_fraction=0.0, cache_dir=False)
    order = bundle.train.labels.argsort(stable=True)  # sorted by class, as files often are
    bundle.train.images, bundle.train.labels = bundle.train.images[order], \
        bundle.train.labels[order]
    first = bundle.train.images[:40].clone()
    a = _limit_training(bundle, 40, seed=0)
    assert len(a.train) == 40 and set(a.train.labels.tolist()) == {0, 1, 2, 3}
    assert not torch.equal(a.train.images, first)


def test_one_number_formatter():
    from graphsearch import cli, report, units

    assert cli.human is units.human
    assert units.human(40_813_184) == "40.813 M" and units.human(272_474) == "272.474 k"
    assert units.human(608) == "608" and units.human(0.1234, "ms") == "0.123 ms"
    assert report._fmt(13_603_000, "flops") == "13.603 M"
    assert report._fmt(4.0, "latency") == "4.000 ms"
