import textwrap

import pytest
import torch


@pytest.fixture
def write_model(tmp_path):
    """Write a user's model.py (dedented source) into a fresh folder; returns its path."""

    def write(source: str, name: str = "model.py"):
        path = tmp_path / name
        path.write_text(textwrap.dedent(source))
        return path

    return write


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for the module's tests (use with `pytest.mark.usefixtures`, or as an
    argument of a module-scoped fixture that trains). Tiny models gain nothing from intra-op
    threads, and on a busy 2-core machine OpenMP threads waiting on each other made the tests
    up to 15x slower (measured)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def trained(one_thread):
    """The tiny test model trained one epoch on 200 synthetic 16x16 images of 4 classes:
    (model, its channel graph, the data), for the candidate-evaluating methods' tests."""
    from graphsearch.analysis import analyze
    from graphsearch.data import load_dataset
    from graphsearch.train import train
    from tiny_model import Tiny

    data = load_dataset("synthetic:200:4", image_size=16, cache_dir=False)
    torch.manual_seed(0)
    model = Tiny()
    train(model, data, epochs=1, lr=0.05, batch_size=50, progress=False)
    return model, analyze(model, (torch.zeros(1, 3, 16, 16),)), data


def _train_tiny(cls):
    from graphsearch.analysis import analyze
    from graphsearch.data import load_dataset
    from graphsearch.train import train

    data = load_dataset("synthetic:400:4", image_size=16, cache_dir=False)
    torch.manual_seed(0)
    model = cls()
    train(model, data, epochs=2, lr=0.05, batch_size=50, progress=False)
    return model, analyze(model, (torch.zeros(1, 3, 16, 16),)), data


@pytest.fixture(scope="module")
def trained_tiny(one_thread):
    """The tiny test model trained two epochs on 400 synthetic 16x16 images of 4 classes:
    (model, its channel graph, the data), for the regularising methods' end-to-end tests."""
    from tiny_model import Tiny

    return _train_tiny(Tiny)


@pytest.fixture(scope="module")
def trained_tiny_hidden(one_thread):
    """`trained_tiny` with a hidden linear layer without a norm (its gate sits right after
    the producer): variational dropout's and generative synthesis' tests."""
    from tiny_model import TinyHidden

    return _train_tiny(TinyHidden)


@pytest.fixture(scope="module")
def trained_two_stage(one_thread):
    """`trained_tiny` for `hand_models.TwoStage` (two residual stages): the caps' tests."""
    from hand_models import TwoStage

    return _train_tiny(TwoStage)
