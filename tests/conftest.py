"""Shared fixtures."""

from pathlib import Path

import pytest
import torch
from evaluate_fixtures import tiny_runs


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models: one thread is fastest, and on a loaded 2-core machine two threads are ~100x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def runs(tmp_path_factory) -> dict[str, Path]:
    """Tiny trained MHA and LRKV run folders (tests/evaluate_fixtures.py), built once per session."""
    return tiny_runs(str(tmp_path_factory.getbasetemp() / "tiny_runs"))


def pytest_collection_modifyitems(config, items):
    """Tests that need trained runs (the `runs` fixture trains tiny models) are `slow`, like whole-training tests:
    `pytest -m "not slow"` is the fast loop of model, attention, data and optimizer tests."""
    for item in items:
        if "runs" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.slow)
