"""Shared pytest setup.

* ``needs_cuda`` tests skip with a reason when no CUDA device is present (these machines and CI have none).
* Exit status 5 ("no tests collected") is turned into 0, only as a guard: the suite always has CPU tests.
* Tests use one torch thread by default: on two shared cores, two OpenMP threads make small ops up to 100x slower
  (measured). ``GKD_TEST_THREADS=N`` sets another count (scripts/test_matrix.sh runs the suite with 1 and 2).
"""
import pytest
import torch

from tests.helpers import TEST_THREADS

torch.set_num_threads(TEST_THREADS)


def pytest_configure(config):
    config.addinivalue_line("markers", "needs_cuda: needs an NVIDIA GPU; skipped where torch sees none")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU: torch.cuda.is_available() is False on this machine")
    for item in items:
        if "needs_cuda" in item.keywords:
            item.add_marker(skip)


def pytest_sessionfinish(session, exitstatus):
    if exitstatus == 5:
        session.exitstatus = 0
