"""Shared pytest setup.

* ``needs_cuda`` tests skip with a reason when no CUDA device is present (these machines and CI have none).
* Exit status 5 ("no tests collected") is turned into 0, only as a guard: the suite always has CPU tests.
* Tests use at most 2 torch threads, like the project's machines.
"""
import pytest
import torch

torch.set_num_threads(min(2, torch.get_num_threads()))


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
