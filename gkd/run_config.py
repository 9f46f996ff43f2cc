"""What ``gkd run`` does: its config, its presets, and the training stages' configs resolved from it.

Every training stage's config (the teacher's and the students' YAML with this run's ``teacher.*`` / ``student.*``
sections merged in as data) is resolved and validated here, before any stage runs: a misspelt key stops the run with
a one-line error naming it and the closest valid key.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal, Optional

from gkd.kd import CONFIG_DIR
from gkd.kd.config import SynthPreset

__all__ = ["PipelineConfig", "StageConfigs", "resolve_stage_configs", "load_pipeline_config", "teacher_processes",
           "QUICK", "QAD_SCHEDULE"]


@dataclass(frozen=True)
class PipelineConfig:
    """What ``gkd run`` does. ``teacher`` / ``student`` are merged over the stage's own YAML config."""

    name: str = "default"
    runs_dir: str = "runs"
    seed: int = 0
    #: dataset folder; the synthetic generator fills it when it holds no train.json
    data_root: str = "data/synth"
    synth_images: int = 1000
    synth_size: int = 160
    #: the synthetic world (``gkd data synth --preset``): clean (the default) or cluttered
    synth_preset: SynthPreset = "clean"
    teacher_config: str = str(CONFIG_DIR / "teacher.yaml")
    student_config: str = str(CONFIG_DIR / "distill_gkd.yaml")
    #: an existing teacher checkpoint (gkd or torchvision format) instead of training one
    teacher_checkpoint: str = ""
    #: nested mappings merged over the teacher / student run configs, e.g. {"train": {"epochs": 2}}
    teacher: dict = field(default_factory=dict)
    student: dict = field(default_factory=dict)
    #: the teacher's own seed (its initialisation and data order), apart from the students' ``seed``: the teacher
    #: is an independent model, never the student's own run carried on longer
    teacher_seed: int = 1
    #: the teacher trains in this many local processes of one thread each (torchrun, Gloo on a CPU; its
    #: ``train.batch_size`` is split between them, the global batch stays): measured 20% faster than one 2-thread
    #: process over 40 steps on a 2-core CPU, within the noise over a whole run. 1: one process (its threads chosen
    #: by ``train.threads``). 0 (the default): 2 on a machine with at least 2 cores, else 1
    teacher_processes: int = 0
    #: also train the student without distillation (same schedule, data order and seed) and export it, so that the
    #: report says what distillation bought at each deployed precision
    baseline: bool = True
    #: train the distilled and the baseline student at the same time, in two processes of one thread each (on a
    #: machine with at least 2 free cores): two 1-thread processes get ~25% more work through 2 cores than one
    #: 2-thread process after the other (docs/train.md, "CPU threads"). Off: one after the other, with progress bars
    side_by_side: bool = True
    #: also ship a quantization-aware distilled student (QAD): the distilled student fine-tuned with fake INT8 in
    #: this format (tensorrt or onnxruntime) against the teacher, with the distillation method of ``student``, for
    #: ``qad_student``'s schedule (default :data:`QAD_SCHEDULE`); exported from its learned scales and shown as
    #: "int8 (QAD)" beside the post-training INT8 in the deployment table. null: off
    qad: Optional[Literal["tensorrt", "onnxruntime"]] = None
    #: nested keys merged over the QAD stage's config (after ``student``), e.g. {"train": {"epochs": 2}}
    qad_student: dict = field(default_factory=dict)
    #: export precisions, and whether to benchmark latency/mAP of the exports
    precisions: tuple[str, ...] = ("fp32", "fp16", "int8")
    bench: bool = True
    bench_iterations: int = 30
    #: validation images cycled through while timing
    bench_images: int = 16
    #: write the report's PNG plots (training curves, per-class AP, latency, mAP against latency)
    plots: bool = True
    #: the accuracy gate: the shipped student's INT8 mAP must be at least this fraction of its FP32 mAP, and its
    #: FP32 export must detect (mAP > 0); `gkd run` exits 1 naming the model and the numbers otherwise (0: no gate)
    gate_min_ratio: float = 0.99
    #: the gate also requires the shipped INT8 file's p50 latency not to be above this x FP32's beyond chance (bench
    #: stage, side by side, onnxruntime CPU, one thread; paired bootstrap over the rounds); 0: not checked. INT8's speed-up depends on the CPU's integer dot-product
    #: instructions (VNNI, AMX), so the default asks only that INT8 be faster
    gate_max_int8_latency_ratio: float = 1.0

    RANGES: ClassVar[dict] = {"gate_min_ratio": ((">=", 0), ("<=", 10)), "gate_max_int8_latency_ratio": ((">=", 0),),
                              "synth_images": ((">=", 2),),
                              "teacher_processes": ((">=", 0),),
                              "bench_iterations": ((">=", 1),), "bench_images": ((">=", 1),)}

    @property
    def run_dir(self) -> Path:
        return Path(self.runs_dir) / self.name


#: the QAD stage's schedule (under ``qad_student``): a short fine-tune of the trained distilled student at a
#: twentieth of its learning rate, BatchNorm frozen, scales starting from post-training calibration
QAD_SCHEDULE: dict[str, Any] = {"train": {"epochs": 1, "lr": 0.0001, "warmup_iters": 0, "eval_interval": 1},
                                "quant": {"calib_images": 64}}


#: the --quick preset: a small dataset and short schedules (the user's keys are applied over it)
QUICK: dict[str, Any] = {
    # the quick world: 1-3 large solid shapes of 3 classes, no hard cases, 96 px (``gkd data synth --preset quick``)
    "name": "quick", "data_root": "data/quick", "synth_preset": "quick", "synth_images": 300, "synth_size": 96,
    "bench_iterations": 5,
    "teacher": {"train": {"epochs": 5, "warmup_iters": 20}, "model": {"min_size": 96, "max_size": 96}},
    # the students: 300 steps of 4 images (not 150 of 8: about the same time) at lr 5e-4. From scratch on this world
    # the step count decides (measured, baseline student, one thread, same seed: 150 x 8 at lr 2e-3 3.3 mAP, at 1e-3
    # 4.3, at 5e-4 4.0; 300 x 4 at 2e-3 3.2, at 1e-3 8.5, at 5e-4 10.3, seed 1 10.8; the distilled one 19.6)
    "student": {"train": {"epochs": 5, "warmup_iters": 20, "lr": 0.0005, "batch_size": 4},
                "model": {"min_size": 96, "max_size": 96}},
}


# ----------------------------------------------------------------------------------------------------------------
# stage configs


@dataclass(frozen=True)
class StageConfigs:
    """The resolved run configs of the training stages (``teacher`` is None when a checkpoint is given)."""

    teacher: Any
    distill: Any
    baseline: Any
    qad: Any = None


def _stage_updates(cfg: PipelineConfig, stage: str, section: dict, prefix: str) -> dict:
    """The user's ``teacher.*`` / ``student.*`` section under this run's fixed keys (stage folder, data, seed)."""
    from gkd.core.config import merge_dicts

    _checked_section(section, prefix)
    seed = cfg.teacher_seed if stage == "teacher" else cfg.seed
    fixed = {"runs_dir": str(cfg.run_dir), "name": stage, "seed": seed, "data": {"root": cfg.data_root}}
    return merge_dicts(fixed, section)


def teacher_processes(cfg: PipelineConfig) -> int:
    """``teacher_processes``, with 0 (auto) resolved from this machine's cores (not their momentary load: the count
    is part of the teacher's key, and a resumed run needs the same one)."""
    from gkd.kd.cpu_share import available_cores

    return cfg.teacher_processes or min(2, available_cores())


def resolve_stage_configs(cfg: PipelineConfig) -> StageConfigs:
    """Validate and resolve every training stage's config before any stage runs (one-line errors name the key)."""
    from gkd.core.config import merge_dicts
    from gkd.core.errors import GkdError
    from gkd.export.pipeline import PRECISIONS
    from gkd.kd.config import RunConfig, load_config
    from gkd.kd.distill.config import DistillRunConfig, method_parts, teacher_section
    from gkd.kd.stage import per_process

    bad = [p for p in cfg.precisions if p not in PRECISIONS]
    if bad:
        raise GkdError(f"precisions: unknown precision '{bad[0]}' in {list(cfg.precisions)}; expected a list of "
                       f"{', '.join(PRECISIONS)}, e.g. precisions=[fp32,int8]")

    teacher = None
    if not cfg.teacher_checkpoint:
        teacher = per_process(load_config(cfg.teacher_config, cls=RunConfig, key_prefix="teacher.",
                                          updates=_stage_updates(cfg, "teacher", cfg.teacher, "teacher.")),
                              teacher_processes(cfg), "teacher_processes", "teacher.")
    teacher_ckpt = cfg.teacher_checkpoint or str(cfg.run_dir / "teacher" / "checkpoints" / "model.pt")
    teacher_keys = {"distill": {"teacher": teacher_section(teacher_ckpt, trained_here=not cfg.teacher_checkpoint)}}
    # the distill stage is the full method unless the user names another (student.distill.method=...)
    section = merge_dicts({"distill": {"method": "gkd"}}, cfg.student)

    def student(stage: str, method: str | None):
        updates = merge_dicts(_stage_updates(cfg, stage, section, "student."), teacher_keys)
        if method:
            updates = merge_dicts(updates, {"distill": {"method": method}})
        return load_config(cfg.student_config, cls=DistillRunConfig, key_prefix="student.", updates=updates)

    qad = None
    if cfg.qad:
        ckpts = cfg.run_dir / "distill" / "checkpoints"
        quant = {"int8_format": cfg.qad}
        if method_parts(section["distill"]["method"]).local:  # the distilled run's adapters, not fresh ones
            quant["adapters_from"] = str(ckpts / "last.pt")
        section_qad = merge_dicts(merge_dicts(section, QAD_SCHEDULE), {
            "model": {"weights": str(ckpts / "model.pt")}, "quant": quant})
        updates = merge_dicts(merge_dicts(_stage_updates(cfg, "qad", section_qad, "student."), teacher_keys),
                              _checked_section(cfg.qad_student, "qad_student."))
        qad = load_config(cfg.student_config, cls=DistillRunConfig, key_prefix="qad_student.", updates=updates)
    return StageConfigs(teacher=teacher, distill=student("distill", None),
                        baseline=student("baseline", "none") if cfg.baseline else None, qad=qad)


def _checked_section(section: dict, prefix: str) -> dict:
    """``section`` (a stage's user keys), refused when it sets what gkd run sets for every stage."""
    from gkd.core.errors import GkdError

    for key in ("name", "runs_dir"):
        if key in section:
            raise GkdError(f"{prefix}{key}: set by gkd run (runs/<name>/<stage>/); use {key}=... for the whole run")
    return section


def load_pipeline_config(config: Path | None, overrides: list[str], quick: bool = False) -> PipelineConfig:
    """The ``gkd run`` config: the --quick preset (if asked), then the YAML file, then command-line overrides."""
    from gkd.core.config import load_config

    return load_config(config, overrides, cls=PipelineConfig, updates=QUICK if quick else None)
