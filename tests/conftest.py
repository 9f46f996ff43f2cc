"""Shared pytest setup.

* ``needs_cuda`` tests skip with a reason when no CUDA device is present (these machines and CI have none).
* Exit status 5 ("no tests collected") is turned into 0, only as a guard: the suite always has CPU tests.
* The suite runs on two pytest-xdist workers (setup.cfg); each module's tests run on one worker, the export tests
  all on one.
* Tests use one torch thread by default: on two shared cores, two OpenMP threads make small ops up to 100x slower
  (measured). ``GKD_TEST_THREADS=N`` sets another count (scripts/test_matrix.sh runs the suite with 1 and 2).
* torch.compile's inductor cache gets a folder per ATen CPU capability (unless ``TORCHINDUCTOR_CACHE_DIR`` is set):
  a precompiled header built under the native AVX2 / AVX-512 kernels does not compile in an
  ``ATEN_CPU_CAPABILITY=default`` run (``at::vec`` not declared), so the two must not share one cache.
"""
import os
import tempfile

if "TORCHINDUCTOR_CACHE_DIR" not in os.environ:  # before torch is imported (inductor reads it lazily, but be sure)
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = os.path.join(
        tempfile.gettempdir(), f"torchinductor_gkd_tests_{os.getuid() if hasattr(os, 'getuid') else 0}",
        os.environ.get("ATEN_CPU_CAPABILITY") or "native")

import pytest  # noqa: E402
import torch  # noqa: E402

from tests.helpers import TEST_THREADS  # noqa: E402

torch.set_num_threads(TEST_THREADS)


def pytest_configure(config):
    config.addinivalue_line("markers", "needs_cuda: needs an NVIDIA GPU; skipped where torch sees none")


def pytest_collection_modifyitems(config, items):
    # pytest-xdist (setup.cfg): a module's tests stay on one worker (its module fixtures are made once), and the
    # export tests all on one (their shared trained tiny detectors take ~100 s to make)
    for item in items:
        path = item.nodeid.split("::")[0]
        item.add_marker(pytest.mark.xdist_group("export" if path.startswith("tests/test_export/") else path))
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU: torch.cuda.is_available() is False on this machine")
    for item in items:
        if "needs_cuda" in item.keywords:
            item.add_marker(skip)


def pytest_sessionfinish(session, exitstatus):
    if exitstatus == 5:
        session.exitstatus = 0
