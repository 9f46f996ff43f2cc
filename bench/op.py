"""``gkd bench op``: the prototype-projection operator vs the two pure-PyTorch versions, side by side, one process.

The workload is one training step's worth of projections: B images, the five FPN levels of an HxW input (strides
4..64, level sizes ceil(H/s) x ceil(W/s)), N instance boxes shared by all levels, M prototypes per level. Boxes
have log-uniform sides in [16, 640] px and aspect ratios in [1/2, 2], clipped to the image (COCO-like RoIs).

Timed: forward only (no autograd), and forward + backward of <pooled, g1> + <cos, g2> summed over levels with the
feature maps requiring grad (the student side of a distillation step). The memory-traffic floor is the bytes that
must move (forward: read every feature map once; forward+backward: also write its gradient once) over the copy
bandwidth measured in the same process (read + write bytes of a large tensor copy per second).
"""
from __future__ import annotations

import math
import os
import statistics
import time
from pathlib import Path
from typing import Callable

import click
import torch

from .harness import sync
from .stamp import cpu_name

__all__ = ["op", "run_op_benchmark"]

_DTYPES = {"float32": torch.float32, "float64": torch.float64, "float16": torch.float16, "bfloat16": torch.bfloat16}


def _time(fn: Callable[[], object], device: torch.device, repeats: int, warmup: int) -> dict:
    """Median/min wall time of ``fn`` in ms; synchronised at both edges of every timed call."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append((time.perf_counter() - t0) * 1e3)
    return {"median_ms": statistics.median(times), "min_ms": min(times), "repeats": repeats}


def copy_bandwidth(device: torch.device, mbytes: int = 256, repeats: int = 5) -> float:
    """Read + write bytes per second of a large contiguous copy (GB/s), best of ``repeats``."""
    n = mbytes * 2**20 // 4
    src = torch.rand(n, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)  # touch the pages once
    t = _time(lambda: dst.copy_(src), device, repeats, warmup=1)["min_ms"]
    return 2 * src.numel() * 4 / (t * 1e-3) / 1e9


def make_workload(batch: int, channels: int, height: int, width: int, strides: list[int], instances: int,
                  prototypes: int, dtype: torch.dtype, device: torch.device, seed: int) -> dict:
    """Feature levels, boxes, prototype banks and upstream gradients, deterministic per seed."""
    g = torch.Generator().manual_seed(seed)
    levels = [torch.randn(batch, channels, math.ceil(height / s), math.ceil(width / s), generator=g)
              for s in strides]
    side = torch.exp(torch.empty(instances).uniform_(math.log(16), math.log(640), generator=g))
    aspect = torch.exp(torch.empty(instances).uniform_(-math.log(2), math.log(2), generator=g))
    w, h = side * aspect.sqrt(), side / aspect.sqrt()
    cx, cy = torch.rand(instances, generator=g) * width, torch.rand(instances, generator=g) * height
    boxes = torch.stack([torch.arange(instances) % batch, (cx - w / 2).clamp(0, width), (cy - h / 2).clamp(0, height),
                         (cx + w / 2).clamp(0, width), (cy + h / 2).clamp(0, height)], dim=1)
    banks = [torch.randn(prototypes, channels, generator=g) for _ in strides]
    grads = [(torch.randn(instances, channels, generator=g), torch.randn(instances, prototypes, generator=g))
             for _ in strides]
    to = dict(device=device, dtype=dtype)
    return {"levels": [x.to(**to) for x in levels], "boxes": boxes.to(device), "banks": [p.to(**to) for p in banks],
            "grads": [(a.to(**to), b.to(**to)) for a, b in grads], "strides": [float(s) for s in strides]}


def _runner(fn, wl: dict, backward: bool, prototype_grad: bool) -> Callable[[], None]:
    levels = [x.detach().requires_grad_(backward) for x in wl["levels"]]
    banks = [p.detach().requires_grad_(backward and prototype_grad) for p in wl["banks"]]

    def run() -> None:
        with torch.set_grad_enabled(backward):
            loss = 0.0
            for x, s, p, (g1, g2) in zip(levels, wl["strides"], banks, wl["grads"]):
                pooled, cos = fn(x, wl["boxes"], s, p)
                if backward:
                    loss = loss + (pooled * g1).sum() + (cos * g2).sum()
            if backward:
                loss.backward()
                for t in levels + banks:
                    t.grad = None

    return run


def _max_error(wl: dict, fn_a, fn_b) -> float:
    """Largest |difference| of the pooled and cos outputs of two versions over all levels (forward)."""
    worst = 0.0
    with torch.no_grad():
        for x, s, p in zip(wl["levels"], wl["strides"], wl["banks"]):
            for a, b in zip(fn_a(x, wl["boxes"], s, p), fn_b(x, wl["boxes"], s, p)):
                worst = max(worst, (a.double() - b.double()).abs().max().item() if a.numel() else 0.0)
    return worst


def _same_class_timing(wl: dict, prototypes: int, instances: int, dev: torch.device, repeats: int, warmup: int,
                       seed: int) -> dict | None:
    """Time ``max_same_class_cos`` (the robust weight's max over own-class prototypes) on every level's [N, M]."""
    from gkd.kd.distill.robust import max_same_class_cos

    if prototypes == 0 or instances == 0:
        return None
    per_class = max(1, prototypes // 80)  # 80 classes x 10 prototypes at the default size
    proto_labels = (torch.arange(prototypes, device=dev) // per_class + 1)  # [M] class 1..K of each column
    k = int(proto_labels.max())
    labels = torch.randint(1, k + 1, (instances,), generator=torch.Generator().manual_seed(seed)).to(dev)
    with torch.no_grad():
        cos = [torch.ops.kd.prototype_project(x, wl["boxes"], s, p)[1]
               for x, s, p in zip(wl["levels"], wl["strides"], wl["banks"])]
    return _time(lambda: [max_same_class_cos(c, labels, proto_labels) for c in cos], dev, repeats, warmup)


def run_op_benchmark(*, device: str = "cpu", threads: int = 2, batch: int = 2, channels: int = 256,
                     height: int = 800, width: int = 1333, strides: tuple[int, ...] = (4, 8, 16, 32, 64),
                     instances: int = 256, prototypes: int = 800, dtype: str = "float32", repeats: int = 10,
                     reference_repeats: int = 1, warmup: int = 1, prototype_grad: bool = False,
                     seed: int = 0) -> dict:
    """Time the extension, the vectorised and the per-instance versions; returns a JSON-able dict."""
    from gkd.core.errors import GkdError
    from gkd.kd import _ops
    from gkd.kd.prototype import prototype_project_reference, prototype_project_vectorized

    if instances < 1:  # no box: no output depends on the features, so there is no backward to time
        raise GkdError(f"instances: {instances}; expected at least 1 box per step")
    dev = torch.device(device)
    torch.set_num_threads(threads)
    _ops.assert_has_ops()
    if not _ops.has_kernel(dev.type):
        raise click.UsageError(f"gkd.kd._C has no {dev.type} kernel ({_ops.backend_summary()})")
    load_before = os.getloadavg()[0]
    wl = make_workload(batch, channels, height, width, list(strides), instances, prototypes, _DTYPES[dtype], dev,
                       seed)
    versions = {"extension": torch.ops.kd.prototype_project, "vectorized": prototype_project_vectorized,
                "per_instance": prototype_project_reference}
    results = {}
    for name, fn in versions.items():
        reps = reference_repeats if name == "per_instance" else repeats
        if reps <= 0:
            continue
        wu = 0 if name == "per_instance" else warmup  # ~18 s per call on 2 CPU threads: no warm-up for it
        results[name] = {"forward": _time(_runner(fn, wl, False, prototype_grad), dev, reps, wu),
                         "forward_backward": _time(_runner(fn, wl, True, prototype_grad), dev, reps, wu)}
    feature_bytes = sum(x.numel() * x.element_size() for x in wl["levels"])
    # Well beyond the last-level cache, about the size of what the operator moves, 64..256 MB.
    bw = copy_bandwidth(dev, mbytes=int(min(256, max(64, 2 * feature_bytes / 2**20))))
    return {
        "benchmark": "op", "device": str(dev), "threads": threads, "torch": torch.__version__,
        "backend": _ops.backend_summary(),
        "device_name": torch.cuda.get_device_name(dev) if dev.type == "cuda" else cpu_name(),
        "load_average_1min": [load_before, os.getloadavg()[0]],
        "THP_MEM_ALLOC_ENABLE": os.environ.get("THP_MEM_ALLOC_ENABLE", ""),
        "batch": batch, "channels": channels, "image": [height, width], "strides": list(strides),
        "levels": [list(x.shape[2:]) for x in wl["levels"]], "instances": instances, "prototypes": prototypes,
        "dtype": dtype, "prototype_grad": prototype_grad, "results": results, "feature_bytes": feature_bytes,
        "copy_bandwidth_gbs": bw,
        "floor": {"forward_ms": feature_bytes / bw / 1e6, "forward_backward_ms": 2 * feature_bytes / bw / 1e6},
        "max_same_class_cos": _same_class_timing(wl, prototypes, instances, dev, repeats, warmup, seed),
        "max_abs_diff_extension_vs_vectorized": _max_error(wl, torch.ops.kd.prototype_project,
                                                           prototype_project_vectorized),
    }


def format_table(r: dict) -> str:
    """The human-readable summary printed by ``gkd bench op``."""
    load = r["load_average_1min"]
    lines = [f"prototype projection on {r['device']} ({r['device_name']}, {r['threads']} threads, load average "
             f"{load[0]:.2f} -> {load[1]:.2f}), torch {r['torch']}, {r['backend']}",
             f"B={r['batch']} C={r['channels']} image {r['image'][0]}x{r['image'][1]}, levels {r['levels']} "
             f"(strides {r['strides']}), N={r['instances']} M={r['prototypes']}, {r['dtype']}"
             f"{', prototypes require grad' if r['prototype_grad'] else ''}",
             "",
             "times: median (min) ms over the runs; speed-up: this version's median over the extension's",
             f"{'version':<14}{'forward ms':>18}{'fwd+bwd ms':>20}{'fwd speed-up':>14}{'fwd+bwd speed-up':>18}  runs"]
    ext = r["results"]["extension"]
    for name, res in r["results"].items():
        f, fb = res["forward"], res["forward_backward"]
        lines.append(f"{name:<14}{f['median_ms']:>10.1f} ({f['min_ms']:>6.1f}){fb['median_ms']:>11.1f} "
                     f"({fb['min_ms']:>7.1f}){f['median_ms'] / ext['forward']['median_ms']:>13.1f}x"
                     f"{fb['median_ms'] / ext['forward_backward']['median_ms']:>17.1f}x  {f['repeats']}")
    fl = r["floor"]
    lines += ["",
              f"memory-traffic floor at {r['copy_bandwidth_gbs']:.1f} GB/s (measured copy, read+write): forward "
              f"{r['feature_bytes'] / 1e6:.0f} MB -> {fl['forward_ms']:.1f} ms, fwd+bwd "
              f"{2 * r['feature_bytes'] / 1e6:.0f} MB -> {fl['forward_backward_ms']:.1f} ms",
              f"extension vs floor: forward {ext['forward']['median_ms'] / fl['forward_ms']:.1f}x, fwd+bwd "
              f"{ext['forward_backward']['median_ms'] / fl['forward_backward_ms']:.1f}x "
              f"(achieved {r['feature_bytes'] / ext['forward']['median_ms'] / 1e6:.1f} GB/s forward, "
              f"{2 * r['feature_bytes'] / ext['forward_backward']['median_ms'] / 1e6:.1f} GB/s fwd+bwd)",
              "max over same-class prototypes (robust weight, PyTorch on cos [N, M]), all levels: "
              + (f"{r['max_same_class_cos']['median_ms']:.2f} ms" if r["max_same_class_cos"] else "n/a"),
              f"max |extension - vectorized| (forward outputs): {r['max_abs_diff_extension_vs_vectorized']:.2e}"]
    if r["device"] == "cpu" and r["THP_MEM_ALLOC_ENABLE"] != "1":
        lines.append("note: first-touch page faults on fresh gradient tensors are a large part of every version's "
                     "backward on CPU; on Linux, THP_MEM_ALLOC_ENABLE=1 lets torch use huge pages for large tensors")
    return "\n".join(lines)


def _ints(ctx: click.Context | None, param: click.Parameter | None, text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(","))
    except ValueError:
        raise click.BadParameter(f"{text!r}: expected comma-separated integers, e.g. 4,8,16,32,64") from None
    if not values or min(values) <= 0:
        raise click.BadParameter(f"{text!r}: expected positive integers")
    return values


@click.command("op")
@click.option("--device", type=click.Choice(["cpu", "cuda"], case_sensitive=False), default="cpu", show_default=True,
              help="Where the tensors live.")
@click.option("--threads", type=click.IntRange(1), default=2, show_default=True, help="torch CPU threads.")
@click.option("--batch", type=click.IntRange(1), default=2, show_default=True, help="Images per step (B).")
@click.option("--channels", type=click.IntRange(1), default=256, show_default=True, help="FPN channels (C).")
@click.option("--image-size", nargs=2, type=click.IntRange(1), default=(800, 1333), show_default=True,
              help="Input height and width in pixels; level l is ceil(H/s) x ceil(W/s).")
@click.option("--strides", default="4,8,16,32,64", show_default=True, callback=_ints,
              help="Comma-separated level strides.")
@click.option("--instances", type=click.IntRange(1), default=256, show_default=True,
              help="Boxes per step (N); at least 1 (with none there is nothing to project or differentiate).")
@click.option("--prototypes", type=click.IntRange(0), default=800, show_default=True,
              help="Prototypes per level (M), e.g. 80 classes x 10.")
@click.option("--dtype", type=click.Choice(list(_DTYPES), case_sensitive=False), default="float32",
              show_default=True, help="Feature dtype (float16/bfloat16: CUDA only).")
@click.option("--repeats", type=click.IntRange(1), default=10, show_default=True,
              help="Timed runs of the extension and the vectorised version (median reported).")
@click.option("--reference-repeats", type=click.IntRange(0), default=1, show_default=True,
              help="Timed runs of the per-instance version (about 18 s each on 2 CPU threads); 0 skips it.")
@click.option("--prototype-grad/--no-prototype-grad", default=False, show_default=True,
              help="Also differentiate w.r.t. the prototype banks (they are constants in distillation).")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the random maps, boxes and banks.")
@click.option("--json", "json_path", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Also write the results as JSON here.")
def op(device, threads, batch, channels, image_size, strides, instances, prototypes, dtype, repeats,
       reference_repeats, prototype_grad, seed, json_path):
    """Time kd::prototype_project against the vectorised and per-instance PyTorch versions (forward, fwd+bwd)."""
    from gkd.core.errors import GkdError
    from gkd.core.io import atomic_write_json
    from gkd.kd import _ops

    if not _ops.has_ops():
        raise GkdError(f"gkd.kd._C: {_ops.backend_summary()}; expected the built extension (see docs/operator.md)")

    if json_path is not None:  # before the timing: a file of the user's is never replaced
        from gkd.core.io import json_field_is, refuse_foreign_file

        refuse_foreign_file(json_path, "--json", json_field_is("benchmark", "op"))
    if device == "cuda" and not torch.cuda.is_available():
        raise GkdError("--device cuda: torch sees no CUDA device here; expected a machine with a GPU")
    if device == "cpu" and dtype in ("float16", "bfloat16"):
        raise GkdError(f"--dtype {dtype}: the CPU kernel supports float32/float64; expected one of those on cpu")
    result = run_op_benchmark(device=device, threads=threads, batch=batch, channels=channels, height=image_size[0],
                              width=image_size[1], strides=strides, instances=instances,
                              prototypes=prototypes, dtype=dtype, repeats=repeats,
                              reference_repeats=reference_repeats, prototype_grad=prototype_grad, seed=seed)
    click.echo(format_table(result))
    if json_path is not None:
        atomic_write_json(json_path, result)
        click.echo(f"wrote {json_path}")


if __name__ == "__main__":
    op()
