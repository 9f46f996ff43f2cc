"""train.threads=0 (auto): leave other processes the cores they use (gkd/kd/cpu_share.py)."""
from __future__ import annotations

import subprocess
import sys

import pytest

from gkd.kd import cpu_share


@pytest.mark.parametrize("cores, load, threads", [(2, 0.0, 2), (2, 0.4, 2), (2, 1.0, 1), (2, 3.0, 1), (16, 2.6, 13)])
def test_auto_threads_leaves_the_other_processes_their_cores(monkeypatch, cores, load, threads):
    monkeypatch.setattr(cpu_share, "available_cores", lambda: cores)
    monkeypatch.setattr(cpu_share, "other_load", lambda window_s: load)
    got, why = cpu_share.auto_threads()
    assert got == threads and f"{cores} core(s) available, other processes use {load:.1f}" == why


def test_auto_threads_without_a_measurement_uses_every_core(monkeypatch):
    monkeypatch.setattr(cpu_share, "available_cores", lambda: 3)
    monkeypatch.setattr(cpu_share, "other_load", lambda window_s: None)
    assert cpu_share.auto_threads()[0] == 3


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/stat (Linux)")
def test_other_load_sees_a_busy_process_and_not_our_own_work():
    import threading

    stop = threading.Event()
    hog = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        seen = cpu_share.other_load(0.6)
    finally:
        hog.kill()
        hog.wait()
    assert seen is not None and seen >= 0.3  # a busy loop gets a good share of a core on any sane machine

    def spin():  # this process's own CPU time is not "other" load
        while not stop.is_set():
            pass

    worker = threading.Thread(target=spin)
    worker.start()
    try:
        own = cpu_share.other_load(0.6)
    finally:
        stop.set()
        worker.join()
    assert own is not None and own < seen
