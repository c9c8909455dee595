"""The statistics the rank-correlation benchmarks report (benchmarks/rank_correlation.py,
benchmarks/table_scores.py): Kendall's tau-b and the share of well-separated pairs ordered
right."""
import json
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from graphsearch.analysis import analyze
from graphsearch.data import ImageTensorDataset, load_dataset
from graphsearch.load import UserError
from graphsearch.passes.slim import slim
from graphsearch.target import parse_constraint
from graphsearch.zoo import build, example_inputs

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from rank_correlation import kendall_tau  # noqa: E402
from rank_correlation import random_plan  # noqa: E402
from rank_correlation import main, read_keep  # noqa: E402
import peer  # noqa: E402
from peer import keep_record, plan_module, widths  # noqa: E402
from table_scores import concordant_apart  # noqa: E402
from train_baseline import with_cutout  # noqa: E402


def test_kendall_tau_known_values():
    assert kendall_tau([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert kendall_tau([1, 2, 3, 4], [40, 30, 20, 10]) == pytest.approx(-1.0)
    # one swapped pair of six: (5 - 1) / 6
    assert kendall_tau([1, 2, 3, 4], [1, 3, 2, 4]) == pytest.approx(4 / 6)
    # tau-b with a tie in one ranking: 5 concordant, 0 discordant, 1 tie in a
    assert kendall_tau([1, 1, 2, 3], [1, 2, 3, 4]) == pytest.approx(5 / (5 * 6) ** 0.5)


def test_concordant_apart_ignores_pairs_inside_the_spread():
    truth = [85.0, 85.3, 80.0]
    # the score swaps the first two plans (0.3 apart: inside the spread) and orders the far
    # pairs right
    assert concordant_apart([0.4, 0.3, 0.1], truth) == pytest.approx(1.0)
    assert concordant_apart([0.1, 0.3, 0.4], truth) == pytest.approx(0.0)
    assert kendall_tau([0.4, 0.3, 0.1], truth) == pytest.approx(1 / 3)
    assert concordant_apart([1, 2], [85.0, 85.2]) != concordant_apart([1, 2], [85.0, 85.2])  # nan


def test_random_plan_lands_on_the_target_and_its_seed_names_it():
    """`peer.py`'s random plans (the cheap scores' truth) are rebuilt from their seed by
    `table_scores.py`: the same seed must give the same plan, another seed another plan, and
    every plan must be at the target."""
    torch.manual_seed(0)
    model = build("resnet20")
    g = analyze(model, example_inputs("resnet20"))
    cons = [parse_constraint("flops", str(1 / 3), g.baseline.flops)]
    plans = [random_plan(g, model, cons, 8, seed, random_order=order)
             for seed in (1, 2) for order in (True, False)]
    again = random_plan(g, model, cons, 8, 1, random_order=True)
    assert again.keep == plans[0].keep
    assert len({str(sorted((k, tuple(v)) for k, v in p.keep.items())) for p in plans}) == 4
    for p in plans:
        assert g.cost(p.keep).flops <= g.baseline.flops / 3 * 1.001
        assert all(len(v) % 8 == 0 for v in p.keep.values())


def test_plan_keep_reads_a_cache_entry_and_names_a_bad_file(tmp_path):
    """`rank_correlation.py --plan-keep NAME=FILE` takes a plan from a search's evaluator
    cache entry (group ids as strings) and refuses anything else with the reason, before
    any data is read."""
    entry = tmp_path / "cand.json"
    entry.write_text('{"key": "k", "keep": {"2": [], "7": [1, 4]}, "accuracy": 0.3}')
    assert read_keep(f"esnac={entry}") == ("esnac", {2: [], 7: [1, 4]})
    bad = tmp_path / "bad.json"
    bad.write_text('{"accuracy": 0.3}')
    for spec in (f"x={bad}", f"x={tmp_path / 'missing.json'}", "no-file"):
        with pytest.raises(SystemExit) as e:
            main(["--out", str(tmp_path / "out"), "--train", "/nonexistent",
                  "--plan-keep", spec])
        assert "--plan-keep" in str(e.value) and "'keep' mapping" in str(e.value)


def test_a_peer_cell_records_its_plan_for_rescoring(tmp_path):
    """A `peer.py` cell stores the plan its module was sliced by, and `rank_correlation.py
    --plan-keep` rebuilds the same module from the stored cell."""
    torch.manual_seed(0)
    model = build("resnet20")
    args = SimpleNamespace(model="resnet20", flops=1 / 3, round_to=8)
    pruned = plan_module(model, "random-order:1", args)
    cell = tmp_path / "cell.json"
    cell.write_text(json.dumps({"widths": widths(pruned), "keep": keep_record(pruned)}))
    name, keep = read_keep(f"r={cell}")
    rebuilt = slim(analyze(model, example_inputs("resnet20")), keep)
    assert widths(rebuilt) == widths(pruned) != widths(model)
    assert keep_record(model) is None


def test_peer_cells_of_one_run_share_a_plan_search(tmp_path, monkeypatch):
    """`peer.py`'s cells of one run (seeds x recipes) slice one plan: the method's search runs
    once, each cell fine-tunes its own copy, and a cell says whether it reused the plan."""
    torch.manual_seed(0)
    model = build("resnet20", num_classes=4)
    searches = []

    def fake_plan(baseline, plan, args, data=None):
        searches.append(plan)
        return plan_module(baseline, "random-order:1", args)

    monkeypatch.setattr(peer, "plan_module", fake_plan)
    data = load_dataset("synthetic:64:4", val_fraction=0.25, test_fraction=0.25)
    args = SimpleNamespace(model="resnet20", flops=1 / 3, round_to=8, out=tmp_path,
                           search_seed=0, epochs=1, lr=0.05)
    plans: dict = {}
    rows = [peer.cell(args, data, model, "method:x", recipe, seed, plans)
            for seed in (0, 1) for recipe in ("project", "project+distill")]
    assert searches == ["method:x"]
    assert [r["plan_reused"] for r in rows] == [False, True, True, True]
    assert len({tuple(r["widths"]) for r in rows}) == 1 and rows[0]["widths"] != widths(model)
    assert rows[0]["keep"] and all(r["keep"] == rows[0]["keep"] for r in rows)  # rescorable
    assert len({r["search_seconds"] for r in rows}) == 1
    # the shared plan is a pristine copy: the cells' fine-tuning did not train it
    fresh = plan_module(model, "random-order:1", args).state_dict()
    kept = plans["method:x"][0].state_dict()
    assert all(torch.equal(kept[k], v) for k, v in fresh.items())
    assert len(list(tmp_path.glob("*.json"))) == 4


def test_peer_plan_from_a_finished_cell_runs_no_search(tmp_path, monkeypatch):
    """`peer.py --plan-from LABEL=CELL.json`: more seeds of a plan another run searched, rebuilt
    from the cell's recorded channels on the baseline's weights (no new search); a cell whose
    weights were not the baseline's (its test top-1 before fine-tuning differs) is refused."""
    torch.manual_seed(0)
    model = build("resnet20", num_classes=4)
    data = load_dataset("synthetic:64:4", val_fraction=0.25, test_fraction=0.25)
    args = SimpleNamespace(model="resnet20", flops=1 / 3, round_to=8, out=tmp_path / "a",
                           search_seed=0, epochs=1, lr=0.05)
    args.out.mkdir()
    first = peer.cell(args, data, model, "random-order:1", "project", 0, {})
    source = args.out / "random-order:1__project__s0.json"

    def no_search(*a, **k):
        raise AssertionError("searched again")

    monkeypatch.setattr(peer, "plan_module", no_search)
    args.out, args.plan_from = tmp_path / "b", {"random-order:1": str(source)}
    args.out.mkdir()
    plans: dict = {}
    rows = [peer.cell(args, data, model, "random-order:1", "project", s, plans) for s in (1, 2)]
    for r in rows:
        assert r["keep"] == first["keep"] and r["widths"] == first["widths"]
        assert r["test_before"] == first["test_before"] and r["plan_reused"]
        assert r["plan_from"] == str(source) and r["seed"] != first["seed"]
    tampered = json.loads(source.read_text())
    tampered["test_before"] += 0.01
    source.write_text(json.dumps(tampered))
    args.out = tmp_path / "c"
    args.out.mkdir()
    with pytest.raises(SystemExit, match="before fine-tuning"):
        peer.cell(args, data, model, "random-order:1", "project", 1, {})


def test_cutout_zeroes_one_square_per_augmented_image_the_same_for_a_seed():
    """train_baseline.py --cutout: each augmented image loses one size x size square (fewer at
    the border), the same squares for the same aug_seed (a resumed run), none unaugmented."""
    g = torch.Generator().manual_seed(0)
    images = torch.randint(1, 256, (64, 3, 32, 32), dtype=torch.uint8, generator=g)
    ds = ImageTensorDataset(images, torch.zeros(64, dtype=torch.long), [0.0] * 3, [1.0] * 3,
                            augment=True, pad=0, flip=False)
    with_cutout(ds, 16)
    x, _ = ds.get_batch(list(range(64)), aug_seed=5)
    zeros = (x == 0).all(1).sum((1, 2))
    assert zeros.max() == 256 and zeros.min() >= 64  # a quarter of a square at worst
    assert (zeros == 256).sum() > 10  # many squares lie wholly inside the image
    again, _ = ds.get_batch(list(range(32, 64)), aug_seed=5)
    assert torch.equal(again, x[32:])
    assert not torch.equal(ds.get_batch(list(range(64)), aug_seed=6)[0], x)
    plain, _ = ds.get_batch(list(range(64)), augment=False)
    assert (plain == 0).all(1).sum() == 0


def test_peer_plan_from_splits_at_the_label_that_names_a_plan():
    """A plan label and a cell's file name may both hold '=' (`method:morphnet:max_ratio=0.7`,
    whose cell is `method:morphnet:max_ratio=0.7__...json`): splitting at the first '=' gave the
    label `method:morphnet:max_ratio`, which no plan has, and the search silently ran again."""
    label = "method:morphnet:max_ratio=0.7"
    cell = f"/runs/{label}__project+distill__s0.json"
    assert peer.plan_sources([f"{label}={cell}"], ["graphsearch", label]) == {label: cell}
    assert peer.plan_sources(["graphsearch=/a=b.json"], ["graphsearch"]) == \
        {"graphsearch": "/a=b.json"}
    with pytest.raises(SystemExit, match="one of --plans"):
        peer.plan_sources([f"method:morphnet={cell}"], [label])


def test_a_peer_plan_label_with_a_misspelt_setting_fails_before_the_search(tmp_path):
    # `method:morphnet:cost_weigth=0.5` ran MorphNet with its defaults under that label
    model = build("resnet20")
    with pytest.raises(UserError, match="cost_weigth: not a setting of morphnet"):
        peer.graphsearch_plan(model, None, 0.33, 8, peer.settings_of("cost_weigth=0.5"),
                              tmp_path, method="morphnet", epochs=1.0)


def test_a_peer_cell_resumes_its_interrupted_fine_tune(tmp_path, monkeypatch):
    """A `peer.py` cell's fine-tune checkpoints every epoch: a run stopped after its first
    epoch resumes there (the cell says so) and the checkpoint is gone once the cell is written."""
    torch.manual_seed(0)
    model = build("resnet20", num_classes=4)
    monkeypatch.setattr(peer, "plan_module",
                        lambda baseline, plan, args, data=None:
                        plan_module(baseline, "random-order:1", args))
    data = load_dataset("synthetic:64:4", val_fraction=0.25, test_fraction=0.25)
    args = SimpleNamespace(model="resnet20", flops=1 / 3, round_to=8, out=tmp_path,
                           search_seed=0, epochs=2, lr=0.05)
    real_train = peer.train

    def stopped_after_one_epoch(*a, **kw):
        def stop(_model, step):  # one step an epoch here (32 training images, batch 128)
            if step == 2:
                raise KeyboardInterrupt
        return real_train(*a, **kw, on_step=stop)

    monkeypatch.setattr(peer, "train", stopped_after_one_epoch)
    with pytest.raises(KeyboardInterrupt):
        peer.cell(args, data, model, "method:x", "project", 0)
    assert [p.name for p in tmp_path.iterdir()] == ["method:x__project__s0.ckpt"]
    monkeypatch.setattr(peer, "train", real_train)
    row = peer.cell(args, data, model, "method:x", "project", 0)
    assert row["resumed_from"] and row["resumed_from"]["epoch"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["method:x__project__s0.json"]
