"""One step count: every budget in optimizer steps is the trainer's own count of an epoch
(`train.steps_per_epoch`), which drops a last batch of one sample (it breaks BatchNorm)."""

import torch
from torch import nn
from torch.utils.data import TensorDataset

from graphsearch.analysis import analyze
from graphsearch.data import DataBundle
from graphsearch.methods.common import steps_for
from graphsearch.methods.base import SearchContext
from graphsearch.methods.common import budget_steps
from graphsearch.train import steps_per_epoch, train


def test_budgets_agree_with_the_trainer_when_one_sample_is_left_over(tmp_path, one_thread):
    # 101 samples in batches of 50: two steps (the 101st sample alone would be a third batch)
    g = torch.Generator().manual_seed(0)
    ds = TensorDataset(torch.randn(101, 3, 4, 4, generator=g), torch.randint(0, 2, (101,)))
    data = DataBundle(ds, ds, 2, ["a", "b"], {}, (3, 4, 4))
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.LazyLinear(2))
    model(torch.zeros(1, 3, 4, 4))
    ctx = SearchContext(graph=analyze(model, (torch.zeros(1, 3, 4, 4),)), model=model,
                        data=data, constraints=[], round_to=1, settings={}, epochs=1.0,
                        lr=0.01, batch_size=50, seed=0, state_dir=tmp_path, progress=False)
    taken = train(model, data, epochs=1, lr=0.01, batch_size=50, progress=False).history[0]["steps"]
    assert taken == steps_per_epoch(101, 50) == 2
    assert budget_steps(ctx, 1.0) == ctx.budget_steps(1.0) == 2  # was 3
    assert steps_for(ctx, 1) == 2  # was 3
    assert ctx.train(model, 1.0, "budget").history[0]["steps"] == 2
