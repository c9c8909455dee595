import textwrap

import pytest


@pytest.fixture
def write_model(tmp_path):
    """Write a user's model.py (dedented source) into a fresh folder; returns its path."""

    def write(source: str, name: str = "model.py"):
        path = tmp_path / name
        path.write_text(textwrap.dedent(source))
        return path

    return write
