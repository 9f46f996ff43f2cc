"""Console logging for the CLI: ``gkd: <message>`` lines on stderr (run folders also get a log.txt)."""
from __future__ import annotations

import logging
import sys

__all__ = ["setup_console_logging"]


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is *now* (it may be swapped, e.g. by test capture or a progress bar)."""

    def __init__(self):
        super().__init__(sys.stderr)

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value):
        pass


def setup_console_logging(verbose: bool = False) -> logging.Logger:
    """Attach one stderr handler to the "gkd" logger (idempotent)."""
    log = logging.getLogger("gkd")
    log.setLevel(logging.DEBUG if verbose else logging.INFO)
    if not any(isinstance(h, _StderrHandler) for h in log.handlers):
        h = _StderrHandler()
        h.setFormatter(logging.Formatter("gkd: %(message)s"))
        log.addHandler(h)
    log.propagate = False
    return log
