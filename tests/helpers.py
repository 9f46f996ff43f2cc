"""Small shared test settings."""
import os

#: torch threads for the whole suite (``GKD_TEST_THREADS``, default 1; scripts/test_matrix.sh runs 1 and 2)
TEST_THREADS = int(os.environ.get("GKD_TEST_THREADS", "1"))
