"""How many CPU threads a training process should use on a machine other processes may be using too.

PyTorch's CPU pool spins while it waits for its slowest thread. On a 2-core machine with one other CPU-bound
process, a 2-thread training step waits for a thread that is not scheduled: measured here (ResNet-18 FPN, batch 4,
160 px) **0.66 s/step quiet and 1.75 s/step beside one busy process (2.7x)**, while one thread takes 0.88 s quiet
and 0.85 s beside it. ``OMP_WAIT_POLICY=PASSIVE`` fixes the loaded case (0.94 s) but costs 25% on a quiet machine
(0.82 s), and it must be set before torch is imported.

So ``train.threads: 0`` (auto) measures, once when a run (or a resumed run) starts, how much CPU the *other*
processes use (over ``window_s``, from ``/proc/stat`` minus this process's own CPU time) and leaves them their
share: ``threads = cores available - round(other load)``, at least 1. The choice is logged and recorded in the
run's metrics; ``train.threads=N`` fixes it (a rerun with the same seed and threads gives the same numbers).
"""
from __future__ import annotations

import os
import time

__all__ = ["available_cores", "other_load", "auto_threads"]


def available_cores() -> int:
    """Cores this process may run on (its affinity mask, e.g. under taskset or a container's cpuset)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def _busy_jiffies() -> float | None:
    """Non-idle CPU time of the whole machine so far, in seconds (None where /proc/stat is missing)."""
    try:
        with open("/proc/stat") as f:
            fields = [float(x) for x in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0.0)  # idle + iowait
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def _own_cpu_s() -> float:
    t = os.times()
    return t.user + t.system


def other_load(window_s: float = 1.0) -> float | None:
    """Cores' worth of CPU the other processes used over the next ``window_s`` seconds (None: not measurable).

    Counts the whole machine (``/proc/stat``), not only this process's cores: on a machine whose cores are
    shared it is what competes with us."""
    a, own_a, t_a = _busy_jiffies(), _own_cpu_s(), time.perf_counter()
    if a is None:
        return None
    time.sleep(window_s)
    b, own_b, t_b = _busy_jiffies(), _own_cpu_s(), time.perf_counter()
    if b is None:
        return None
    return max(0.0, ((b - a) - (own_b - own_a)) / (t_b - t_a))


def auto_threads(window_s: float = 1.0) -> tuple[int, str]:
    """``(threads, why)``: the available cores less what other processes are using, at least 1."""
    cores = available_cores()
    load = other_load(window_s)
    if load is None:
        return cores, f"{cores} core(s) available (other processes' load not measurable here)"
    threads = max(1, min(cores, cores - round(load)))
    return threads, f"{cores} core(s) available, other processes use {load:.1f}"
