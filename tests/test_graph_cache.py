"""The analysis cache: a second analysis of the same model is read from disk (no trace), and
a change of the model's code, its weights' shapes or the input shape analyses again."""

import warnings
from pathlib import Path

import pytest
import torch

from graphsearch import graph_cache
from graphsearch.cli import main
from graphsearch.graph_cache import analyze_cached
from graphsearch.load import load_model
from graphsearch.passes.slim import slim

TINY = (Path(__file__).parent / "tiny_model.py").read_text()


@pytest.fixture
def counted(monkeypatch):
    """How many times the real analysis ran."""
    calls = []
    real = graph_cache.analyze

    def analyze(*a, **k):
        calls.append(1)
        return real(*a, **k)

    monkeypatch.setattr(graph_cache, "analyze", analyze)
    return calls


def _model_py(tmp_path, text=TINY) -> Path:
    path = tmp_path / "model.py"
    path.write_text(text)
    return path


def test_a_second_analysis_is_read_back_and_bound_to_the_new_model(tmp_path, counted):
    path = _model_py(tmp_path)
    first = load_model(str(path))
    g1, hit1 = analyze_cached(first.model, first.example_inputs, folder=tmp_path / "c")
    again = load_model(str(path))  # another process would build another model object
    with torch.no_grad():
        for p in again.model.parameters():
            p.add_(0.1)  # other weights, same shapes: the same graph
    g2, hit2 = analyze_cached(again.model, again.example_inputs, folder=tmp_path / "c")
    assert (hit1, hit2, len(counted)) == (False, True, 1)
    assert [(g.id, g.size, g.prunable, list(g.members)) for g in g1.groups] == \
        [(g.id, g.size, g.prunable, list(g.members)) for g in g2.groups]
    keep = {g.id: list(range(0, g.size, 2)) for g in g2.prunable_groups}
    assert g1.cost(keep) == g2.cost(keep)
    # the graph shares the new model's tensors, as a fresh analysis does
    assert {id(p) for p in g2.module.parameters()} <= {id(p) for p in again.model.parameters()}
    x = again.example_inputs[0]
    fresh = graph_cache.analyze(again.model, again.example_inputs)
    with torch.no_grad():
        assert torch.equal(slim(g2, keep).eval()(x), slim(fresh, keep).eval()(x))


@pytest.mark.parametrize("change", ["code", "weights' shapes", "input shape"])
def test_a_change_of_code_or_shapes_analyses_again(tmp_path, counted, change):
    path = _model_py(tmp_path)
    loaded = load_model(str(path))
    analyze_cached(loaded.model, loaded.example_inputs, folder=tmp_path / "c")
    inputs = loaded.example_inputs
    if change == "code":  # same classes, same shapes, another forward
        _model_py(tmp_path, TINY.replace("def forward(self, x):",
                                         "def forward(self, x):\n        x = x * 1.0"))
    loaded = load_model(str(path))
    if change == "weights' shapes":
        loaded.model.fc = torch.nn.Linear(loaded.model.fc.in_features, 7)
    if change == "input shape":
        inputs = (torch.zeros(2, *inputs[0].shape[1:]),)
    _, hit = analyze_cached(loaded.model, inputs, folder=tmp_path / "c")
    assert not hit and len(counted) == 2


def test_a_damaged_entry_is_analysed_again_and_warnings_are_given_again(tmp_path, counted):
    loaded = load_model(str(_model_py(tmp_path)))
    folder = tmp_path / "c"
    analyze_cached(loaded.model, loaded.example_inputs, folder=folder)
    entry = next(folder.iterdir())
    entry.write_bytes(entry.read_bytes()[:100])
    g, hit = analyze_cached(loaded.model, loaded.example_inputs, folder=folder)
    assert not hit and len(counted) == 2 and g.groups
    # a hit repeats what the analysis said
    monkey = []
    real = graph_cache.analyze

    def noisy(*a, **k):
        warnings.warn("graphsearch: a note of the analysis")
        monkey.append(1)
        return real(*a, **k)

    graph_cache.analyze = noisy
    try:
        other = tmp_path / "d"
        with pytest.warns(UserWarning, match="a note of the analysis"):
            analyze_cached(loaded.model, loaded.example_inputs, folder=other)
        with pytest.warns(UserWarning, match="a note of the analysis"):
            _, hit = analyze_cached(loaded.model, loaded.example_inputs, folder=other)
    finally:
        graph_cache.analyze = real
    assert hit and len(monkey) == 1


def test_inspect_twice_traces_once(tmp_path, counted, monkeypatch, capsys):
    monkeypatch.setenv("GRAPHSEARCH_CACHE", str(tmp_path / "cache"))
    path = _model_py(tmp_path)
    assert main(["inspect", str(path)]) == 0
    out1 = capsys.readouterr().out
    assert main(["inspect", str(path)]) == 0
    assert capsys.readouterr().out == out1 and len(counted) == 1
    monkeypatch.setenv("GRAPHSEARCH_ANALYSIS_CACHE", "0")
    assert main(["inspect", str(path)]) == 0 and len(counted) == 2
