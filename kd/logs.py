"""Console logging for the CLI: ``gkd: <message>`` lines on stderr (run folders also get a log.txt)."""
from __future__ import annotations

import logging

__all__ = ["setup_console_logging"]


def setup_console_logging(verbose: bool = False) -> logging.Logger:
    """Attach one stderr handler to the "gkd" logger (idempotent)."""
    log = logging.getLogger("gkd")
    log.setLevel(logging.DEBUG if verbose else logging.INFO)
    if not any(getattr(h, "_gkd_console", False) for h in log.handlers):
        h = logging.StreamHandler()
        h.setFormatter(logging.Formatter("gkd: %(message)s"))
        h._gkd_console = True
        log.addHandler(h)
    log.propagate = False
    return log
