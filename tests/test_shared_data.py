"""Data that stays where it is: decoded images memory-mapped from one file (`--shared-data`,
and the default above a size) instead of held by the search and shipped to every worker."""

import copy
import dataclasses
import pickle

import numpy as np
import pytest
import torch

from graphsearch import data as data_mod
from graphsearch.analysis import analyze
from graphsearch.data import load_dataset
from graphsearch.evaluator import CandidateEvaluator, EvalSettings
from graphsearch.load import UserError
from tiny_model import Tiny


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """An ImageFolder of 3 classes x 12 PNGs (12x10, one of them grayscale)."""
    from PIL import Image

    root = tmp_path_factory.mktemp("imgs") / "set"
    rng = np.random.default_rng(0)
    for c in "abc":
        (root / c).mkdir(parents=True)
        for i in range(12):
            shape = (12, 10) if i == 3 else (12, 10, 3)
            Image.fromarray(rng.integers(0, 255, shape, dtype=np.uint8)).save(root / c / f"{i}.png")
    return root


def test_mapped_splits_are_the_in_memory_splits(folder, tmp_path):
    mem = load_dataset(folder, cache_dir=tmp_path / "a", mapped=False, val_fraction=0.25,
                       test_fraction=0.25)
    mapped = load_dataset(folder, cache_dir=tmp_path / "b", mapped=True, val_fraction=0.25,
                          test_fraction=0.25)
    assert mem.train.mapped is None and mapped.train.mapped is not None
    assert mapped.preprocessing["mean"] == mem.preprocessing["mean"]
    for a, b in ((mem.train, mapped.train), (mem.val, mapped.val), (mem.test, mapped.test)):
        idx = torch.arange(len(a))
        xa, ya = a.get_batch(idx, aug_seed=3)
        xb, yb = b.get_batch(idx, aug_seed=3)
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    # a subset is a view of the same file
    sub = mapped.train.subset([0, 2])
    assert sub.images.data_ptr() == mapped.train.images.data_ptr() and len(sub) == 2
    # read back from the cache the second time, not decoded again
    again = load_dataset(folder, cache_dir=tmp_path / "b", mapped=True, val_fraction=0.25,
                         test_fraction=0.25)
    assert any("read from cache" in n for n in again.notes)


def test_a_mapped_split_travels_as_its_path(tmp_path):
    big = load_dataset("synthetic:2000:4", image_size=32, cache_dir=tmp_path, mapped=True)
    small = load_dataset("synthetic:2000:4", image_size=32, cache_dir=tmp_path, mapped=False)
    shipped = len(pickle.dumps(big.for_search()))
    assert shipped < 20 * len(big.train)  # row numbers and labels, not 3 KB per image
    assert len(pickle.dumps(small.for_search())) > 3072 * len(small.train)
    back = pickle.loads(pickle.dumps(big.train))
    idx = torch.arange(0, len(back), 7)
    assert torch.equal(back.get_batch(idx, augment=False)[0],
                       big.train.get_batch(idx, augment=False)[0])
    # a worker that cannot see the file says so in one line
    moved = copy.copy(big.train)
    moved.mapped = dataclasses.replace(moved.mapped, path=str(tmp_path / "elsewhere.u8"))
    there = pickle.loads(pickle.dumps(moved))  # opened where it is used, not on arrival
    with pytest.raises(UserError, match="--shared-data"):
        there.get_batch(idx)


def test_above_the_size_mapping_is_the_default(tmp_path, monkeypatch):
    monkeypatch.setattr(data_mod, "MAP_ABOVE_BYTES", 100 * 3 * 16 * 16)
    assert load_dataset("synthetic:200:4", image_size=16, cache_dir=tmp_path).train.mapped
    assert load_dataset("synthetic:80:4", image_size=16, cache_dir=tmp_path).train.mapped is None
    assert load_dataset("synthetic:200:4", image_size=16, cache_dir=False).train.mapped is None
    with pytest.raises(UserError, match="cache folder"):
        load_dataset("synthetic:200:4", image_size=16, cache_dir=False, mapped=True)


def test_candidates_on_mapped_data_score_as_on_data_in_memory(folder, tmp_path, one_thread):
    """What a worker gets (the pickled splits, opened again) scores as the search's own
    copy. (Spawning real workers takes half a minute here; benchmarks/shared_data.py and
    the evaluator's tests run them.)"""
    kw = dict(val_fraction=0.25, image_size=16)
    mem = load_dataset(folder, cache_dir=tmp_path / "a", mapped=False, **kw).for_search()
    mapped = load_dataset(folder, cache_dir=tmp_path / "b", mapped=True, **kw).for_search()
    mapped = pickle.loads(pickle.dumps(mapped))
    model = Tiny()
    graph = analyze(model, (torch.zeros(1, 3, 16, 16),))
    g = graph.prunable_groups[0].id
    plans = [{g: [0, 1, 2]}, {g: [1, 3]}]
    settings = EvalSettings(steps=2, lr=0.01, batch_size=9)
    ref = CandidateEvaluator(graph, mem, settings, workers=1).evaluate(plans, model.state_dict())
    got = CandidateEvaluator(graph, mapped, settings, workers=1).evaluate(plans,
                                                                      model.state_dict())
    assert [r.accuracy for r in got] == [r.accuracy for r in ref]
    assert all(0 <= r.accuracy <= 1 for r in got)
