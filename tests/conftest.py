"""Shared pytest set-up: markers and small synthetic fixtures."""
import pytest


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: longer end-to-end tests (CI runs them separately)")
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU and CuPy; skipped without one")
