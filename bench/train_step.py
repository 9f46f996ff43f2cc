"""``gkd bench train``: seconds per training step and images per second at inference, teacher vs student.

Both configs are measured in one process, round robin (one batch through every model, then the next batch), on the
same real batches of the training split (loaded into memory first: data loading is not timed). Reported per model:
median wall seconds per training step (forward + backward + SGD update) and inference images per second at batch 1,
plus this process's CPU seconds for the same work (robust to other jobs on a shared machine).
"""
from __future__ import annotations

import json
import platform
import statistics
import time
from pathlib import Path
from typing import Any

import click
import torch

from gkd.kd import CONFIG_DIR

__all__ = ["train_step", "run_train_benchmark"]



def _timed(fn) -> tuple[float, float]:
    w, c = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - w, time.process_time() - c


def run_train_benchmark(configs: dict[str, Path], overrides: list[str], steps: int, infer_images: int,
                        threads: int) -> dict[str, Any]:
    """Measure each named config; returns the report dict."""
    from gkd.kd.config import load_config
    from gkd.kd.data import CocoDetection, collate
    from gkd.kd.engine import EpochSampler, build_optimizer, seed_everything
    from gkd.kd.train import build_model, load_splits

    torch.set_num_threads(threads)
    cfgs = {name: load_config(path, overrides) for name, path in configs.items()}
    first = next(iter(cfgs.values()))
    train_index, val_index = load_splits(first)
    k = len(train_index.classes)
    train_set = CocoDetection(train_index, train=True, min_size=first.model.min_size, max_size=first.model.max_size,
                              hflip=first.train.hflip, seed=first.seed)
    val_set = CocoDetection(val_index, train=False, min_size=first.model.min_size, max_size=first.model.max_size)
    order = list(EpochSampler(len(train_set), first.seed))
    bs = first.train.batch_size
    batches = [collate([train_set[i] for i in order[j * bs:(j + 1) * bs]]) for j in range(steps + 1)]
    infer = [val_set[i][0] for i in range(min(infer_images, len(val_set)))]
    models, opts = {}, {}
    for name, cfg in cfgs.items():
        seed_everything(cfg.seed)
        models[name] = build_model(cfg, k).train()
        opts[name] = build_optimizer([p for p in models[name].parameters() if p.requires_grad], cfg.train)

    def step(name, images, targets):
        def run():
            loss = sum(models[name](images, [{"boxes": t["boxes"], "labels": t["labels"]} for t in targets]).values())
            opts[name].zero_grad()
            loss.backward()
            opts[name].step()
        return run

    times: dict[str, dict[str, list[float]]] = {n: {"train_wall": [], "train_cpu": [], "infer_wall": [],
                                                    "infer_cpu": []} for n in cfgs}
    for i, (images, targets) in enumerate(batches):
        for name in cfgs:
            w, c = _timed(step(name, images, targets))
            if i > 0:  # the first step warms up allocators and caches
                times[name]["train_wall"].append(w)
                times[name]["train_cpu"].append(c)
    for name, model in models.items():
        model.eval()
    with torch.no_grad():
        for name in cfgs:
            models[name]([infer[0]])  # warm-up
        for im in infer:
            for name in cfgs:
                w, c = _timed(lambda: models[name]([im]))
                times[name]["infer_wall"].append(w)
                times[name]["infer_cpu"].append(c)
    rows = {}
    for name, cfg in cfgs.items():
        t = times[name]
        rows[name] = {"arch": cfg.model.arch, "backbone": cfg.model.backbone, "input": cfg.model.max_size,
                      "batch": bs, "step_s": statistics.median(t["train_wall"]),
                      "step_cpu_s": statistics.median(t["train_cpu"]),
                      "infer_img_per_s": 1.0 / statistics.median(t["infer_wall"]),
                      "infer_cpu_s": statistics.median(t["infer_cpu"]),
                      "params_m": sum(p.numel() for p in models[name].parameters()) / 1e6}
    return {"benchmark": "train_step", "threads": threads, "steps": steps, "infer_images": len(infer),
            "machine": {"platform": platform.platform(), "torch": torch.__version__}, "models": rows}


def format_report(rep: dict[str, Any]) -> str:
    names = list(rep["models"])
    base = rep["models"][names[-1]]
    lines = ["| model | params | input | batch | s / train step | CPU s / step | inference img/s (batch 1) "
             "| inference img/s by CPU time | step vs last row (CPU) |", "|---|---|---|---|---|---|---|---|---|"]
    for name, r in rep["models"].items():
        lines.append(f"| {name} ({r['arch']} {r['backbone']}) | {r['params_m']:.1f} M | {r['input']} px | "
                     f"{r['batch']} | {r['step_s']:.2f} | {r['step_cpu_s']:.2f} | {r['infer_img_per_s']:.1f} | "
                     f"{1.0 / r['infer_cpu_s']:.1f} | {r['step_cpu_s'] / base['step_cpu_s']:.2f}x |")
    return "\n".join(lines)


@click.command("train")
@click.argument("overrides", nargs=-1, metavar="[KEY=VALUE]...")
@click.option("--teacher", "teacher_cfg", type=click.Path(path_type=Path, dir_okay=False),
              default=CONFIG_DIR / "teacher.yaml", show_default=True)
@click.option("--student", "student_cfg", type=click.Path(path_type=Path, dir_okay=False),
              default=CONFIG_DIR / "student.yaml", show_default=True)
@click.option("--steps", type=click.IntRange(1), default=5, show_default=True, help="Timed training steps per model.")
@click.option("--infer-images", type=click.IntRange(1), default=20, show_default=True)
@click.option("--threads", type=click.IntRange(1), default=2, show_default=True)
@click.option("--json", "json_path", type=click.Path(path_type=Path, dir_okay=False), default=None)
def train_step(overrides, teacher_cfg, student_cfg, steps, infer_images, threads, json_path) -> None:
    """Seconds per training step and inference images/s of the default teacher and student, side by side.

    KEY=VALUE overrides apply to both configs (e.g. data.root=data/mine). Needs the dataset (gkd data synth).
    """
    from gkd.core.io import atomic_write_json

    rep = run_train_benchmark({"teacher": teacher_cfg, "student": student_cfg}, list(overrides), steps,
                              infer_images, threads)
    click.echo(format_report(rep))
    if json_path:
        atomic_write_json(json_path, rep)
        click.echo(f"wrote {json_path}")
    else:
        click.echo(json.dumps({n: {k: round(v, 3) if isinstance(v, float) else v for k, v in r.items()}
                               for n, r in rep["models"].items()}))
