"""``gkd bench overhead MODEL.onnx``: what the latency harness adds over a bare loop of ``session.run``.

Both loops run the same onnxruntime session on the same prepared inputs, in alternating blocks (bare, harness,
bare, harness, ...) so that load changes on a shared machine hit both alike. Two ratios are printed, harness over
bare, from the medians over blocks:

- ``wall``: the wall time of a whole block (the harness's bookkeeping included: clock reads, list appends, the
  round-robin rotation);
- ``reported``: the harness's mean per-call sample against the bare loop's per-call time (what a user reads).

The target is at most 1.02 for both (the issue's "the harness adds at most 2%").
"""
from __future__ import annotations

import statistics
import time
from pathlib import Path

import click

__all__ = ["measure_overhead", "overhead"]


def measure_overhead(model: Path, data: Path, *, calls: int = 100, blocks: int = 7, threads: int = 1,
                     images: int = 4) -> dict:
    """Alternate ``blocks`` bare and harness blocks of ``calls`` calls each; returns the medians and ratios."""
    from gkd.export.images import load_image_set
    from gkd.export.runtime import OrtRunner

    from .harness import TimingPolicy, measure
    from .latency import compute_call
    from .stamp import machine_stamp

    tensors = [im for _, im in load_image_set(data, limit=images).images]
    with OrtRunner(model, threads=threads) as runner:
        call = compute_call(runner, tensors)
        prepared = [runner.prepare(t.unsqueeze(0)) for t in tensors]
        for p in prepared:  # warm both paths before any block is timed
            runner.compute(p)
        bare_wall, harness_wall, harness_mean = [], [], []
        for _ in range(blocks):
            t0 = time.perf_counter()
            for i in range(calls):
                runner.compute(prepared[i % len(prepared)])
            bare_wall.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            t = measure({"m": call}, TimingPolicy.fixed(0, calls))["m"]
            harness_wall.append(time.perf_counter() - t0)
            harness_mean.append(statistics.fmean(t.samples_ms))
        provider = runner.provider
    bare_ms = statistics.median(bare_wall) / calls * 1e3
    return {"model": str(model), "provider": provider, "calls_per_block": calls, "blocks": blocks,
            "bare_ms_per_call": bare_ms, "harness_wall_ms_per_call": statistics.median(harness_wall) / calls * 1e3,
            "harness_reported_mean_ms": statistics.median(harness_mean),
            "ratio_wall": statistics.median(harness_wall) / statistics.median(bare_wall),
            "ratio_reported": statistics.median(harness_mean) / bare_ms,
            "target": 1.02, "stamp": machine_stamp(threads)}


@click.command("overhead", context_settings={"max_content_width": 110})
@click.argument("model", type=click.Path(path_type=Path, exists=True, dir_okay=False))
@click.option("--data", type=click.Path(path_type=Path, exists=True, dir_okay=False), required=True,
              help="COCO JSON whose images are the inputs.")
@click.option("--calls", type=click.IntRange(1), default=100, show_default=True, help="Calls per block.")
@click.option("--blocks", type=click.IntRange(1), default=7, show_default=True, help="Blocks of each loop.")
@click.option("--threads", type=click.IntRange(1), default=1, show_default=True)
def overhead(model, data, calls, blocks, threads):
    """The latency harness against a bare session.run loop on MODEL (ONNX), side by side in one run."""
    r = measure_overhead(model, data, calls=calls, blocks=blocks, threads=threads)
    click.echo(f"| loop | ms per call ({r['provider']}, {calls} calls x {blocks} blocks, medians) |\n|---|---|\n"
               f"| bare session.run | {r['bare_ms_per_call']:.3f} |\n"
               f"| harness, block wall time | {r['harness_wall_ms_per_call']:.3f} |\n"
               f"| harness, reported mean | {r['harness_reported_mean_ms']:.3f} |")
    ok = max(r["ratio_wall"], r["ratio_reported"]) <= r["target"]
    click.echo(f"ratio harness/bare: wall {r['ratio_wall']:.4f}, reported {r['ratio_reported']:.4f} "
               f"(target <= {r['target']}: {'met' if ok else 'NOT met'})")
