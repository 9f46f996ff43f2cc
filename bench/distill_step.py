"""``gkd bench distill``: what distillation costs per training step, side by side in one process.

Variants, each a full training step (forward, backward, SGD update, grad clip as configured) on the same batches:

* ``none``          the student alone (its own torchvision training forward);
* ``none+teacher``  the same plus the teacher's backbone + FPN forward under no_grad on the student's input tensor
                    (the floor of any feature-distillation method: the teacher has to run);
* any ``distill.method`` of the menu (default ``gkd``), through ``DistillationTask``.

Each variant gets a freshly built student (same seed) so that they start from the same weights. Batches come from
the training split in the run's seeded order and are loaded into memory first (data loading is not timed). After
the timed steps, one instrumented ``gkd`` step splits the time into parts (forward hooks; CUDA synchronised), and the
prototype refresh is timed twice: the first (teacher + student features) and a later one (student only, teacher
cached), each compared with the epoch time (steps per epoch x the measured step time).

Variants run round robin (one batch through every variant, then the next batch), and on a CPU the ratios use this
process's CPU time per step: on a machine shared with other jobs, wall time mostly measures the neighbours (the
wall-clock medians are reported too). Use ``--threads 1`` there, the default: with two threads on two busy cores,
OpenMP's synchronisation makes small kernels an order of magnitude slower.
"""
from __future__ import annotations

import dataclasses
import platform
import statistics
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable

import click
import torch

from gkd.kd import CONFIG_DIR

from .harness import sync

__all__ = ["distill_step", "run_distill_benchmark"]

DEFAULT_CONFIG = CONFIG_DIR / "distill_gkd.yaml"


def _clock(device: torch.device) -> float:
    """This process's CPU time on a CPU run (robust to other jobs on a shared machine), else wall time."""
    return time.process_time() if device.type == "cpu" else time.perf_counter()


class _Sections:
    """Accumulates time per named part: module forward hooks and timed blocks."""

    def __init__(self, device: torch.device):
        self.device, self.times, self._handles = device, {}, []

    def add(self, name: str, seconds: float) -> None:
        self.times[name] = self.times.get(name, 0.0) + seconds

    def module(self, name: str, module: torch.nn.Module) -> None:
        start = {}

        def pre(*_):
            sync(self.device)
            start["t"] = _clock(self.device)

        def post(*_):
            sync(self.device)
            self.add(name, _clock(self.device) - start["t"])

        self._handles += [module.register_forward_pre_hook(pre), module.register_forward_hook(post)]

    @contextmanager
    def part(self, name: str):
        """Times a block (``DistillationTask.part_timer``: the task's own distillation parts)."""
        sync(self.device)
        t0 = _clock(self.device)
        try:
            yield
        finally:
            sync(self.device)
            self.add(name, _clock(self.device) - t0)

    def remove(self) -> None:
        for h in self._handles:
            h.remove()


@contextmanager
def _threads(n: int):
    before = torch.get_num_threads()
    if n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _prefetch(cfg, n: int):
    """The first ``n`` training batches in the run's seeded order, in memory."""
    from gkd.kd.data import CocoDetection, collate
    from gkd.kd.engine import EpochSampler
    from gkd.kd.train import load_splits

    train_index, _ = load_splits(cfg)
    ds = CocoDetection(train_index, train=True, min_size=cfg.model.min_size, max_size=cfg.model.max_size,
                       hflip=cfg.train.hflip, seed=cfg.seed, keep_empty=cfg.data.keep_empty)
    order = list(EpochSampler(len(ds), cfg.seed))
    bs = cfg.train.batch_size
    batches = [collate([ds[i] for i in order[k * bs:(k + 1) * bs]]) for k in range(min(n, len(ds) // bs))]
    per_epoch = -(-len(ds) // bs)  # the engine's loader keeps the last partial batch
    if cfg.train.max_steps_per_epoch is not None:
        per_epoch = min(per_epoch, cfg.train.max_steps_per_epoch)
    return train_index, batches, per_epoch


def _teacher(cfg, classes, teacher_path: Path | None):
    """The configured teacher, or a randomly initialised one of its declared architecture (same cost)."""
    from gkd.kd.distill.run import load_teacher
    from gkd.kd.models.detectors import build_detector

    tcfg = cfg.distill.teacher
    if teacher_path is not None:
        return load_teacher(dataclasses.replace(tcfg, checkpoint=str(teacher_path)), classes, cfg.model), "loaded"
    mcfg = dataclasses.replace(cfg.model, arch=tcfg.arch or cfg.model.arch, backbone=tcfg.backbone or "resnet50",
                               num_classes=len(classes), weights=None)
    return build_detector(mcfg, len(classes)).eval(), "random init"


def _step_fn(task, optimizer, params, clip: float | None, extra: Callable | None = None):
    def step(images, targets):
        if extra is not None:
            extra(images)
        out = task(images, targets)
        optimizer.zero_grad(set_to_none=True)
        out["loss"].backward()
        if clip is not None:
            torch.nn.utils.clip_grad_norm_(params, clip)
        optimizer.step()
        return out
    return step


def run_distill_benchmark(cfg, *, teacher_path: Path | None = None, methods: tuple[str, ...] = ("gkd",),
                          steps: int = 5, warmup: int = 2, threads: int = 1, refresh: bool = True,
                          progress: Callable[[str], None] = lambda s: None) -> dict[str, Any]:
    """Time training steps of ``none``, ``none+teacher`` and each method in ``methods`` (see the module docstring).

    Returns:
        A dict: ``steps`` (per variant: median/mean/min seconds per step), ``ratios``, ``breakdown_s`` (parts of
        one instrumented gkd step), ``refresh`` (first and later refresh times, epoch time, fractions), settings.
    """
    from gkd.kd.distributed import select_device
    from gkd.kd.engine import build_optimizer, seed_everything
    from gkd.kd.train import build_model

    device = select_device(cfg.train.device)
    with _threads(threads):
        train_index, batches, steps_per_epoch = _prefetch(cfg, warmup + steps)
        k = len(train_index.classes)
        cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, num_classes=k))
        teacher, teacher_kind = _teacher(cfg, train_index.classes, teacher_path)
        teacher.to(device)
        batches = [([im.to(device) for im in ims], [{k2: (v.to(device) if torch.is_tensor(v) else v)
                                                      for k2, v in t.items()} for t in tgs]) for ims, tgs in batches]
        from gkd.kd.distill.run import build_task

        def make(method: str):
            seed_everything(cfg.seed)
            student = build_model(cfg, k)
            dcfg = dataclasses.replace(cfg.distill, method="none" if method == "none+teacher" else method)
            task = build_task(dataclasses.replace(cfg, distill=dcfg), student,
                              None if dcfg.method == "none" else teacher, train_index).to(device)
            task.train()
            params = [p for p in task.parameters() if p.requires_grad]
            extra = None
            if method == "none+teacher":
                def extra(images, student=student):
                    with torch.no_grad():
                        x, _ = student.transform(images)
                        teacher.backbone(x.tensors)
            return task, _step_fn(task, build_optimizer(params, cfg.train), params, cfg.train.grad_clip, extra)

        results: dict[str, dict] = {}
        refresh_info: dict[str, Any] = {}
        variants = ["none", "none+teacher", *[m for m in methods if m != "none"]]
        tasks, steppers = {}, {}
        for method in variants:
            task, step = make(method)
            tasks[method], steppers[method] = task, step
            sync(device)
            t0 = _clock(device)
            m0 = task.on_epoch_start(0, {"device": device})
            sync(device)
            task.train()
            if method == "gkd" and refresh:
                refresh_info["first_s"] = _clock(device) - t0
                refresh_info["pgm"] = {k2: v for k2, v in m0.items() if k2.startswith("pgm_")}
                progress(f"gkd: first prototype refresh {refresh_info['first_s']:.1f} s")
        # Round robin (variant after variant for each batch): on a shared machine, load changes over time and
        # would otherwise favour whichever variant ran in a quiet period.
        times: dict[str, list[float]] = {m: [] for m in variants}
        cpu: dict[str, list[float]] = {m: [] for m in variants}
        for i, (ims, tgs) in enumerate(batches):
            for method in variants:
                sync(device)
                t0, c0 = time.perf_counter(), time.process_time()
                out = steppers[method](ims, tgs)
                sync(device)
                if i >= warmup:
                    times[method].append(time.perf_counter() - t0)
                    cpu[method].append(time.process_time() - c0)
                if not torch.isfinite(out["loss"]):
                    raise click.ClickException(f"{method}: non-finite loss in the benchmark step {i}")
            progress(f"batch {i + 1}/{len(batches)}" + (" (warm-up)" if i < warmup else "") + ": " +
                     ", ".join(f"{m} {times[m][-1]:.2f}s" for m in variants if i >= warmup))
        for method in variants:
            ts, cs = times[method], cpu[method]
            results[method] = {"median_s": statistics.median(ts), "mean_s": statistics.fmean(ts), "min_s": min(ts),
                               "cpu_median_s": statistics.median(cs), "steps": len(ts)}
        # On a CPU shared with other jobs, wall time measures the neighbours as much as the step: the ratios use
        # this process's CPU time there (with one thread it is the step's own compute), wall time on a GPU.
        key = "cpu_median_s" if device.type == "cpu" else "median_s"
        base = results["none+teacher"][key]
        ratios = {m: results[m][key] / base for m in variants}
        ratios_none = {m: results[m][key] / results["none"][key] for m in variants}

        breakdown = {}
        if "gkd" in tasks:
            breakdown = _breakdown(tasks["gkd"], batches[-1], device, cfg)
            if refresh:
                task = tasks["gkd"]
                sync(device)
                t0 = _clock(device)
                task.on_epoch_start(1, {"device": device})
                sync(device)
                refresh_info["later_s"] = _clock(device) - t0
                epoch_s = steps_per_epoch * results["gkd"][key]
                refresh_info.update({"steps_per_epoch": steps_per_epoch, "epoch_s": epoch_s,
                                     "first_fraction": refresh_info["first_s"] / epoch_s,
                                     "later_fraction": refresh_info["later_s"] / epoch_s})
    return {"device": str(device), "threads": torch.get_num_threads() if not threads else threads,
            "cpu": platform.processor() or platform.machine(), "torch": torch.__version__,
            "batch_size": cfg.train.batch_size, "image_size": [cfg.model.min_size, cfg.model.max_size],
            "student": f"{cfg.model.arch}/{cfg.model.backbone}",
            "teacher": f"{teacher.gkd_meta['arch']}/{teacher.gkd_meta['backbone']} ({teacher_kind})",
            "steps": results, "ratio_vs_student_plus_teacher": ratios, "ratio_vs_student": ratios_none,
            "breakdown_s": breakdown, "refresh": refresh_info}


def _breakdown(task, batch, device, cfg) -> dict[str, float]:
    """One instrumented gkd step: seconds per part (the parts overlap nowhere; 'other' is the rest)."""
    sec = _Sections(device)
    student, teacher = task.detector, task.teacher
    sec.module("student transform", student.transform)
    sec.module("student backbone+FPN", student.backbone)
    sec.module("teacher backbone+FPN", teacher.backbone)
    if task.arch == "faster_rcnn":
        sec.module("student RPN", student.rpn)
        for part in ("box_roi_pool", "box_head", "box_predictor"):
            sec.module("student RoI head", getattr(student.roi_heads, part))
            sec.module("teacher RoI head (positives)", getattr(teacher.roi_heads, part))
    else:
        sec.module("student head", student.head)
        sec.module("teacher head (positive levels)", teacher.head.classification_head)
    if task.adapters is not None:
        sec.module("adapters", task.adapters)
    task.part_timer = sec.part  # the task's distillation parts, timed where it runs them
    params = [p for p in task.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=0.0)  # lr 0: the step is timed, the weights stay
    try:
        sync(device)
        t0 = _clock(device)
        out = task(*batch)
        sync(device)
        t1 = _clock(device)
        optimizer.zero_grad(set_to_none=True)
        out["loss"].backward()
        sync(device)
        t2 = _clock(device)
        if cfg.train.grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(params, cfg.train.grad_clip)
        optimizer.step()
        sync(device)
        t3 = _clock(device)
    finally:
        sec.remove()
        task.part_timer = None
    parts = dict(sec.times)
    parts["forward: other (matching, losses glue)"] = (t1 - t0) - sum(parts.values())
    parts["backward (all parts)"] = t2 - t1
    parts["grad clip + SGD update"] = t3 - t2
    parts["total"] = t3 - t0
    return {k: round(v, 4) for k, v in parts.items()}


def format_report(r: dict[str, Any]) -> str:
    lines = [f"device {r['device']} ({r['cpu']}), torch {r['torch']}, threads {r['threads']}, batch {r['batch_size']}, "
             f"images {r['image_size'][0]}x{r['image_size'][1]}",
             f"student {r['student']}, teacher {r['teacher']}", "",
             "ratios from " + ("this process's CPU time per step (shared CPU)" if r["device"] == "cpu"
                               else "wall time per step"), "",
             f"{'variant':<14}{'wall s/step':>12}{'wall min':>10}{'CPU s/step':>12}{'x none+teacher':>16}"
             f"{'x none':>9}"]
    for m, s in r["steps"].items():
        lines.append(f"{m:<14}{s['median_s']:>12.3f}{s['min_s']:>10.3f}{s['cpu_median_s']:>12.3f}"
                     f"{r['ratio_vs_student_plus_teacher'][m]:>16.3f}{r['ratio_vs_student'][m]:>9.3f}")
    if r["breakdown_s"]:
        lines += ["", "one instrumented gkd step (s" + (", CPU time" if r["device"] == "cpu" else "") + "):"]
        lines += [f"  {k:<40}{v:>9.3f}" for k, v in r["breakdown_s"].items()]
    f = r["refresh"]
    if f.get("epoch_s"):
        lines += ["", f"prototype refresh: first {f['first_s']:.1f} s (teacher + student, "
                      f"{100 * f['first_fraction']:.1f}% of an epoch), later {f['later_s']:.1f} s (student only, "
                      f"{100 * f['later_fraction']:.1f}%); epoch = {f['steps_per_epoch']} steps x gkd step = "
                      f"{f['epoch_s']:.0f} s; {f['pgm']}"]
    return "\n".join(lines)


@click.command("distill")
@click.argument("config", type=click.Path(path_type=Path, dir_okay=False), required=False)
@click.argument("overrides", nargs=-1, metavar="[KEY=VALUE]...")
@click.option("--teacher", type=click.Path(path_type=Path, dir_okay=False), default=None,
              help="Teacher checkpoint [default: a randomly initialised teacher of the declared architecture; "
                   "the cost does not depend on the weights].")
@click.option("--methods", default="gkd", show_default=True,
              help="Comma-separated menu entries to time besides none and none+teacher, e.g. local,robust,gkd,pkd.")
@click.option("--steps", type=click.IntRange(1), default=5, show_default=True, help="Timed steps per variant.")
@click.option("--warmup", type=click.IntRange(0), default=2, show_default=True, help="Untimed steps first.")
@click.option("--threads", type=click.IntRange(0), default=1, show_default=True,
              help="torch CPU threads (0 = torch's default).")
@click.option("--no-refresh", is_flag=True, help="Skip timing the prototype refresh.")
@click.option("--out", type=click.Path(path_type=Path, dir_okay=False), default=None,
              help="Also write the results as JSON here.")
def distill_step(config: Path | None, overrides: tuple[str, ...], teacher: Path | None, methods: str, steps: int,
                 warmup: int, threads: int, no_refresh: bool, out: Path | None) -> None:
    """Time a distillation training step: student alone, + teacher forward, and the chosen methods.

    \b
    CONFIG is a `gkd distill` config [default: kd/configs/distill_gkd.yaml]; its data, sizes and batch are used.
    Example (the embedded dataset at the default sizes):
      gkd data synth --out data/synth
      gkd bench distill --methods local,robust,gkd,pkd,pkd+global --out runs/bench/distill_step.json
    """
    from gkd.core.cli import split_config_and_overrides
    from gkd.core.errors import GkdError
    from gkd.core.io import atomic_write_json
    from gkd.kd.config import load_config
    from gkd.kd.distill.config import METHODS, DistillRunConfig

    wanted = tuple(m.strip() for m in methods.split(",") if m.strip())
    bad = [m for m in wanted if m not in METHODS]
    if bad:
        raise GkdError(f"--methods: unknown {bad}; choose from {', '.join(METHODS)}")
    config, overrides = split_config_and_overrides(config, overrides)
    cfg = load_config(config or DEFAULT_CONFIG, overrides, cls=DistillRunConfig)
    r = run_distill_benchmark(cfg, teacher_path=teacher, methods=wanted, steps=steps, warmup=warmup,
                              threads=threads, refresh=not no_refresh, progress=lambda s: click.echo(s, err=True))
    click.echo(format_report(r))
    if out is not None:
        atomic_write_json(out, r)
        click.echo(f"wrote {out}")
