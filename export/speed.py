"""INT8 against FP32 latency, side by side, as ``gkd export`` records it.

Both files run in one process on the same images, one call of each per round with the order alternating, so that
whatever else the machine does hits both alike; the record is each file's median (p50) and the ratio of medians,
with the CPU named and whether it has integer dot-product instructions (VNNI, AMX-INT8), on which INT8's speed-up
depends. This is a sanity record for the export, not a benchmark: ``gkd bench latency`` has warm-up to steady state,
bounded durations and the full stamp.
"""
from __future__ import annotations

import platform
import statistics
import time
from pathlib import Path
from typing import Any, Sequence

import torch

__all__ = ["cpu_description", "side_by_side", "INT8_DOT_PRODUCT_FLAGS"]

#: /proc/cpuinfo flags of x86 integer dot-product instructions (onnxruntime's INT8 kernels use them when present)
INT8_DOT_PRODUCT_FLAGS = ("avx512_vnni", "avx_vnni", "amx_int8", "avx_vnni_int8")


def cpu_description() -> dict[str, Any]:
    """``{"cpu": model name, "int8_dot_product": [flags present], "vector": widest SIMD}`` from /proc/cpuinfo."""
    name, flags = platform.processor() or platform.machine(), set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
            elif line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                break
    except OSError:
        pass
    vector = next((v for v in ("avx512f", "avx2", "avx") if v in flags), "unknown")
    return {"cpu": name, "int8_dot_product": [f for f in INT8_DOT_PRODUCT_FLAGS if f in flags], "vector": vector}


def side_by_side(paths: dict[str, Path], images: Sequence[torch.Tensor], *, threads: int = 1, warmup: int = 3,
                 rounds: int = 20) -> dict[str, Any]:
    """Median latency of each ONNX file in ``paths`` (label -> file), timed in alternating rounds.

    Args:
        paths: e.g. ``{"fp32": ..., "int8": ...}``.
        images: ``[3, H, W]`` images cycled through (each round uses the same image for every file).
        threads: onnxruntime intra-op threads.
        warmup, rounds: untimed calls per file, then timed rounds of one call per file.

    Returns:
        ``{"p50_ms": {label: ms}, "ratio": {"int8/fp32": ...}, "rounds", "threads", "images", "machine"}``.
    """
    from .runtime import OrtRunner

    runners = {label: OrtRunner(path, threads=threads) for label, path in paths.items()}
    times: dict[str, list[float]] = {label: [] for label in runners}
    try:
        for r in runners.values():
            r.activate()
        for i in range(warmup):
            for r in runners.values():
                r.detect(images[i % len(images)])
        labels = list(runners)
        for i in range(rounds):
            order = labels if i % 2 == 0 else labels[::-1]
            image = images[i % len(images)]
            for label in order:
                t0 = time.perf_counter()
                runners[label].detect(image)
                times[label].append(1000.0 * (time.perf_counter() - t0))
    finally:
        for r in runners.values():
            r.deactivate()
    p50 = {label: statistics.median(t) for label, t in times.items()}
    ratio = {f"{a}/fp32": p50[a] / p50["fp32"] for a in p50 if a != "fp32" and "fp32" in p50 and p50["fp32"] > 0}
    return {"p50_ms": p50, "ratio": ratio, "rounds": rounds, "warmup": warmup, "threads": threads,
            "images": len(images), "machine": cpu_description()}
