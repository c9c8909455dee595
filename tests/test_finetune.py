"""The final fine-tune's recipes and distillation, and the candidate scores' adaptive BN and
fixed validation part."""

import copy

import pytest
import torch
from torch import nn

from graphsearch.evaluator import EvalSettings, run_candidate, validation_part
from graphsearch.passes.slim import slim
from graphsearch.train import RECIPES, Distilled, recalibrate_bn, soft_target_loss, train

X = (torch.zeros(1, 3, 16, 16),)
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def setup(trained):
    return trained  # conftest's tiny model, trained one epoch: (model, graph, data)


def lrs(recipe, total=20, lr=0.1):
    m = nn.Linear(2, 2)
    f = recipe.factories(lr)
    opt = f["optimizer"](m)
    sched = f["scheduler"](opt, total)
    out = []
    for _ in range(total):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return out, opt


def test_cosine_recipe_is_the_plain_cosine_from_the_peak():
    out, opt = lrs(RECIPES["sgd-cosine"])
    assert out[0] == pytest.approx(0.1)
    assert out[10] == pytest.approx(0.05)
    assert all(a >= b for a, b in zip(out, out[1:]))
    assert len(opt.param_groups) == 1 and not opt.param_groups[0]["nesterov"]


def test_one_cycle_recipe_warms_up_then_decays_with_nesterov_and_no_decay_on_1d_params():
    out, opt = lrs(RECIPES["one-cycle"], total=20)
    up = int(20 * RECIPES["one-cycle"].warmup)  # 3 steps of warm-up
    assert out[0] == pytest.approx(0.1 / 25)
    assert all(a < b for a, b in zip(out[:up], out[1:up + 1]))
    assert out[up] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(out[up:], out[up + 1:]))
    assert opt.param_groups[0]["nesterov"]
    decays = {g["weight_decay"] for g in opt.param_groups for p in g["params"] if p.ndim == 1}
    assert decays == {0.0}



def test_default_recipe_is_the_peers_exactly():
    """The default (`nesterov-one-cycle`) is benchmarks/peer.py's `peer` recipe, ahead of
    sgd-cosine on the same plan on validation: the same learning rates and momenta at every step, Nesterov,
    weight decay 5e-4 on every parameter."""
    from graphsearch.optimize import OptimizeConfig

    assert OptimizeConfig(model="x").finetune_recipe == "nesterov-one-cycle"
    out, opt = lrs(RECIPES["nesterov-one-cycle"], total=50)
    m = nn.Linear(2, 2)
    ref = torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9, nesterov=True,
                          weight_decay=5e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(ref, max_lr=0.1, total_steps=50)
    want = []
    for _ in range(50):
        want.append(ref.param_groups[0]["lr"])
        ref.step()
        sched.step()
    assert out == pytest.approx(want)
    assert out[0] == pytest.approx(0.1 / 25) and max(out) == pytest.approx(0.1)
    assert len(opt.param_groups) == 1 and opt.param_groups[0]["nesterov"]
    assert opt.param_groups[0]["weight_decay"] == 5e-4

def test_soft_target_loss_is_zero_when_the_student_is_the_teacher_and_weighs_the_labels():
    torch.manual_seed(0)
    t = torch.randn(8, 5)
    y = torch.randint(0, 5, (8,))
    assert float(soft_target_loss(4.0, 1.0)((t, t), y)) == pytest.approx(0.0, abs=1e-6)
    ce = float(nn.functional.cross_entropy(t, y))
    assert float(soft_target_loss(4.0, 0.9)((t, t), y)) == pytest.approx(0.1 * ce, rel=1e-5)
    s = torch.randn(8, 5)
    assert float(soft_target_loss(4.0, 1.0)((s, t), y)) > 0


def test_distilled_training_moves_the_student_to_the_teacher_and_leaves_the_teacher(setup):
    model, graph, data = setup
    teacher = copy.deepcopy(model).eval()
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    student = slim(graph, {graph.prunable_groups[-1].id: list(range(8))})
    fc = [m for m in student.modules() if isinstance(m, nn.Linear)][-1]
    torch.manual_seed(1)
    fc.reset_parameters()  # a student far from its teacher
    res = train(Distilled(student, teacher), data, epochs=4, lr=0.05, batch_size=50,
                progress=False, loss_fn=soft_target_loss(4.0, 1.0), weight_decay=0.0)
    losses = [h["train_loss"] for h in res.history]
    assert losses[-1] < 0.5 * losses[0]  # the soft-target loss is what it minimised
    assert all(torch.equal(before[k], v) for k, v in teacher.state_dict().items())
    assert not teacher.training


def test_recalibrate_bn_gives_the_exact_statistics_of_the_images(setup):
    model, graph, data = setup
    m = copy.deepcopy(model)
    used = recalibrate_bn(m, data.train, 100, batch_size=50, seed=3)
    assert used == 100
    idx = torch.randperm(len(data.train), generator=torch.Generator().manual_seed(3))[:100]
    x, _ = data.train.get_batch(idx, augment=False)
    with torch.no_grad():
        a = m.c1(x)
    assert torch.allclose(m.b1.running_mean, a.mean((0, 2, 3)), atol=1e-5)
    assert m.b1.momentum == model.b1.momentum


def test_candidate_adaptive_bn_changes_the_sliced_score_to_the_recalibrated_one(setup):
    model, graph, data = setup
    keep = {graph.prunable_groups[0].id: list(range(4))}
    plain = run_candidate(slim(graph, keep), data, EvalSettings(0, 0.02, 50), seed=0)
    bn = run_candidate(slim(graph, keep), data, EvalSettings(0, 0.02, 50, bn_images=100),
                       seed=0)
    ref = slim(graph, keep)
    recalibrate_bn(ref, data.train, 100, batch_size=50, seed=0)
    from graphsearch.train import evaluate
    assert bn["accuracy"] == pytest.approx(evaluate(ref, data.val))
    assert plain["accuracy"] == pytest.approx(evaluate(slim(graph, keep), data.val))


def test_validation_part_is_a_fixed_draw_with_the_fast_path(setup):
    _, _, data = setup
    a, b = validation_part(data.val, 10), validation_part(data.val, 10)
    assert len(a) == 10 and torch.equal(a.images, b.images)
    assert callable(getattr(a, "get_batch", None))
    assert validation_part(data.val, 0) is data.val
    assert validation_part(data.val, 10 ** 6) is data.val
