"""What machine a benchmark ran on: one stamp for every report (latency, study, step benchmarks).

The stamp holds the CPU model and cores, the threads used, library versions (read from the installed package
metadata: nothing heavy is imported to learn a version) and, when a GPU is visible, its name, driver, clocks and
throttle reasons through NVML (``nvidia-ml-py``) where it is importable. Take one before and one after timing:
:func:`throttle_warnings` compares them.
"""
from __future__ import annotations

import os
import platform
from importlib import metadata
from pathlib import Path
from typing import Any

__all__ = ["cpu_name", "machine_stamp", "machine_summary", "gpu_stamp", "throttle_warnings"]

_LIBRARIES = ("torch", "torchvision", "onnxruntime-gpu", "onnxruntime", "onnx", "numpy", "tensorrt",
              "tensorrt-rtx", "pycocotools", "faster-coco-eval", "gkd")


def cpu_name() -> str:
    """The CPU model from /proc/cpuinfo, else what ``platform`` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def _versions() -> dict[str, str]:
    out = {}
    for name in _LIBRARIES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return out


def gpu_stamp(index: int = 0) -> dict[str, Any] | None:
    """Name, driver, clocks (MHz), temperature and throttle reasons of GPU ``index`` via NVML; None without a GPU.

    Without NVML (``pip install nvidia-ml-py``) only torch's name and capability are known, and the stamp says so.
    """
    import torch

    if not torch.cuda.is_available():
        return None
    out: dict[str, Any] = {"name": torch.cuda.get_device_name(index),
                           "capability": ".".join(map(str, torch.cuda.get_device_capability(index)))}
    try:
        import pynvml
    except ImportError:
        out["nvml"] = "not importable (pip install nvidia-ml-py for driver, clocks and throttle reasons)"
        return out
    try:
        pynvml.nvmlInit()
        h = pynvml.nvmlDeviceGetHandleByIndex(index)
        driver = pynvml.nvmlSystemGetDriverVersion()
        out.update({
            "driver": driver.decode() if isinstance(driver, bytes) else driver,
            "sm_clock_mhz": pynvml.nvmlDeviceGetClockInfo(h, pynvml.NVML_CLOCK_SM),
            "mem_clock_mhz": pynvml.nvmlDeviceGetClockInfo(h, pynvml.NVML_CLOCK_MEM),
            "max_sm_clock_mhz": pynvml.nvmlDeviceGetMaxClockInfo(h, pynvml.NVML_CLOCK_SM),
            "temperature_c": pynvml.nvmlDeviceGetTemperature(h, pynvml.NVML_TEMPERATURE_GPU),
            "throttle_reasons": int(pynvml.nvmlDeviceGetCurrentClocksThrottleReasons(h)),
        })
    except Exception as exc:  # NVML errors are diagnostics, never a reason to lose the benchmark
        out["nvml"] = f"error: {exc}"
    return out


def machine_stamp(threads: int | None = None) -> dict[str, Any]:
    """CPU model, logical cores, threads used, OS, Python, library versions and the GPU (if any)."""
    import torch

    return {"cpu": cpu_name(), "logical_cores": os.cpu_count(), "threads": threads or torch.get_num_threads(),
            "platform": platform.platform(), "python": platform.python_version(), "versions": _versions(),
            "aten_cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "gpu": gpu_stamp()}


#: NVML's "GPU idle" and "applications clocks setting" bits are no throttling of a running benchmark
_BENIGN_THROTTLE = 0x1 | 0x2


def throttle_warnings(before: dict[str, Any], after: dict[str, Any]) -> list[str]:
    """Warnings when the GPU throttled (any reason but idle / application clocks) or its SM clock moved."""
    out = []
    for when, st in (("before", before.get("gpu")), ("after", after.get("gpu"))):
        if st and st.get("throttle_reasons", 0) & ~_BENIGN_THROTTLE:
            out.append(f"GPU throttling {when} timing (NVML reasons 0x{st['throttle_reasons']:x}): lock the clocks "
                       f"or cool the GPU; latencies may be inflated")
    b, a = before.get("gpu") or {}, after.get("gpu") or {}
    if b.get("sm_clock_mhz") and a.get("sm_clock_mhz") and b["sm_clock_mhz"] != a["sm_clock_mhz"]:
        out.append(f"GPU SM clock changed during timing ({b['sm_clock_mhz']} -> {a['sm_clock_mhz']} MHz)")
    return out


def machine_summary() -> dict[str, Any]:
    """The machine a study ran on, as its report states it."""
    import torch

    return {"platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
            "cpus": os.cpu_count(), "processor": cpu_name(),
            "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None}
