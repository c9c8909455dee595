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
