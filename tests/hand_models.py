"""Hand-sized models and helpers the method tests share (fixtures are in conftest.py)."""

import copy

import torch
from torch import nn

from graphsearch.methods.base import SearchContext
from graphsearch.passes.slim import slim
from graphsearch.target import allowed_widths, parse_constraint


class TwoConv(nn.Module):
    """conv(3->4) -> bn -> relu -> conv(4->5) -> bn -> mean -> linear(5->2)."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 4, 3, padding=1, bias=False)
        self.b1 = nn.BatchNorm2d(4)
        self.c2 = nn.Conv2d(4, 5, 1, bias=False)
        self.b2 = nn.BatchNorm2d(5)
        self.fc = nn.Linear(5, 2)

    def forward(self, x):
        x = torch.relu(self.b1(self.c1(x)))
        x = torch.relu(self.b2(self.c2(x)))
        return self.fc(x.mean((2, 3)))


class Residual(nn.Module):
    """Two BNs on one residual group: MorphNet's r is their max."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 4, 1, bias=False)
        self.b1 = nn.BatchNorm2d(4)
        self.c2 = nn.Conv2d(4, 4, 1, bias=False)
        self.b2 = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        x = self.b1(self.c1(x))
        x = x + self.b2(self.c2(x))
        return self.fc(x.mean((2, 3)))


class TwoStage(nn.Module):
    """Two residual stages (16 channels, then 32 at half the resolution), a block each: the
    stream of the first stage is tied to the stem, both convolutions of its block and the
    downsampling conv, so a FLOP-weighted pull finds its channels the costliest per unit of
    signal (CIFAR ResNet-32: MorphNet, vardrop and group lasso thinned a stream to a quarter)."""

    def __init__(self):
        super().__init__()
        self.stem, self.bs = nn.Conv2d(3, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16)
        self.a1, self.ba1 = nn.Conv2d(16, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16)
        self.a2, self.ba2 = nn.Conv2d(16, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16)
        self.down = nn.Conv2d(16, 32, 3, stride=2, padding=1, bias=False)
        self.bd = nn.BatchNorm2d(32)
        self.b1, self.bb1 = nn.Conv2d(32, 32, 3, padding=1, bias=False), nn.BatchNorm2d(32)
        self.b2, self.bb2 = nn.Conv2d(32, 32, 3, padding=1, bias=False), nn.BatchNorm2d(32)
        self.fc = nn.Linear(32, 4)

    def forward(self, x):
        x = torch.relu(self.bs(self.stem(x)))
        x = torch.relu(x + self.ba2(self.a2(torch.relu(self.ba1(self.a1(x))))))
        x = torch.relu(self.bd(self.down(x)))
        x = torch.relu(x + self.bb2(self.b2(torch.relu(self.bb1(self.b1(x))))))
        return self.fc(x.mean((2, 3)))


X8 = (torch.zeros(1, 3, 8, 8),)


def ctx_for(model, graph, tmp_path, data=None, flops="0.5", settings=None, epochs=1.0):
    return SearchContext(
        graph=graph, model=model, data=data,
        constraints=[parse_constraint("flops", flops, graph.baseline.flops)],
        round_to=1, settings=dict(settings or {}), epochs=epochs, lr=0.02, batch_size=50,
        seed=0, state_dir=tmp_path, progress=False, log=lambda s: None, example_inputs=X8)


def hidden_group(graph, size):
    (g,) = [g for g in graph.prunable_groups if g.size == size]
    return g.id


def randomise(model, seed=0):
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p))
    return model


X16 = (torch.zeros(1, 3, 16, 16),)


def make_ctx(trained, state_dir, *, flops="0.4", round_to=1, settings=None, epochs=1.0,
             log=lambda s: None):
    model, graph, data = trained
    return SearchContext(
        graph=graph, model=copy.deepcopy(model), data=data,
        constraints=[parse_constraint("flops", flops, graph.baseline.flops)],
        round_to=round_to, settings=dict(settings or {}), epochs=epochs, lr=0.02,
        batch_size=50, seed=0, state_dir=state_dir, progress=False, log=log,
        example_inputs=X16)


def check_plan(ctx, proposal, round_to):
    graph = ctx.graph
    limit = ctx.constraints[0].limit
    flops = graph.cost(proposal.plan.keep).flops
    assert flops == proposal.plan.achieved["flops"]
    assert 0.99 * limit <= flops <= limit
    for gid, w in proposal.plan.widths.items():
        g = graph.groups[gid]
        assert w in allowed_widths(g.size, g.min_width, round_to)
    small = slim(graph, proposal.plan.keep, proposal.state_dict).eval()
    with torch.no_grad():
        out = small(torch.randn(3, 3, 16, 16))
    assert out.shape == (3, 4) and bool(torch.isfinite(out).all())
    assert sum(p.numel() for p in small.parameters()) == proposal.plan.achieved["params"]


def end_to_end(method, trained, tmp_path, settings, epochs=3.0):
    """A regularising method's search on `trained` (a conftest fixture) to 40% of the FLOPs:
    it lands within 1% below the target, records its plan's accuracy and a candidate, and
    its weights run slim. Returns (proposal, context)."""
    model, graph, data = trained
    # 3 epochs of 8 steps: MorphNet's lambda assumes momentum's steady state (about 10 steps)
    ctx = ctx_for(copy.deepcopy(model), graph, tmp_path, data, flops="0.4", settings=settings,
                  epochs=epochs)
    ctx.example_inputs = X16
    proposal = method.search(ctx)
    limit = ctx.constraints[0].limit
    flops = graph.cost(proposal.plan.keep).flops
    assert 0.99 * limit <= flops <= limit
    assert proposal.info["lambda"] > 0
    # the search did something: the accuracy of the plan is recorded, and a candidate
    assert 0.0 <= proposal.info["plan_accuracy_before_finetune"] <= 1.0
    assert ctx.candidates and ctx.candidates[-1]["flops"] == flops
    small = slim(graph, proposal.plan.keep, proposal.state_dict).eval()
    with torch.no_grad():
        out = small(torch.randn(2, 3, 16, 16))
    assert out.shape == (2, 4) and bool(torch.isfinite(out).all())
    return proposal, ctx
