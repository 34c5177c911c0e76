"""Shared pytest set-up: markers, and slow tests kept out of the default run.

``python -m pytest tests`` runs the fast suite; ``python -m pytest tests -m slow`` runs the slow
end-to-end tests (CI runs both); ``-m gpu`` the GPU ones (skipped without CuPy and a GPU).
"""
import pytest
import torch


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: longer end-to-end tests (run with -m slow; CI runs them)")
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU and CuPy; skipped without one")


def pytest_collection_modifyitems(config, items):
    if config.getoption("markexpr"):
        return  # an explicit -m selects what runs
    skip = pytest.mark.skip(reason="slow: run with -m slow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="module")
def one_torch_thread():
    """In-process runs use one torch thread (restored after): on a small, shared CPU, OpenMP
    threads that wait for each other make tiny models many times slower."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
