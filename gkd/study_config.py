"""What ``gkd study`` runs: its config, its quick preset, and the grid of student runs it resolves to."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

from gkd.kd import CONFIG_DIR
from gkd.kd.config import SynthPreset

__all__ = ["StudyConfig", "StudyStageConfigs", "QUICK_OVERRIDES", "STUDY_METHODS", "student_runs", "check_grid",
           "resolve_stage_configs", "control_key"]

STUDY_CONFIG_DIR = CONFIG_DIR / "study"

#: the positive control's defect (see StudyConfig.control)
ControlKind = Literal["labels", "blind"]


@dataclass(frozen=True)
class StudyConfig:
    """What ``gkd study`` runs. ``teacher`` / ``student_init`` / ``student`` are overrides on top of the stage
    configs. The default design (docs/study_notes.md): an independent teacher, scale-aware method settings, a
    positive control, ablations, and a power stated in advance."""

    name: str = "study"
    runs_dir: str = "runs"
    #: its own folder: gkd run's data/synth holds another world (1000 images), and a folder that holds a dataset is
    #: used as it is
    data_root: str = "data/study"
    synth_images: int = 1300
    #: of which this many are the val split (the power statement below needs a large one)
    synth_val_images: int = 500
    synth_size: int = 160
    synth_preset: SynthPreset = "clean"
    data_seed: int = 0
    teacher_config: str = str(STUDY_CONFIG_DIR / "teacher.yaml")
    student_config: str = str(STUDY_CONFIG_DIR / "distill.yaml")
    #: an existing teacher checkpoint to use instead of training one
    teacher_checkpoint: str = ""
    teacher: Any = field(default_factory=dict)
    #: the paper's protocol (docs/method.md, section 3.10): every student starts from the same student,
    #: trained once without distillation for this many epochs with its own seed (`gkd train` with
    #: student_init_config); 0 = from random init
    student_init_epochs: int = 2
    student_init_config: str = str(STUDY_CONFIG_DIR / "student_init.yaml")
    student_init: Any = field(default_factory=dict)
    #: overrides for every student run (the distillation phase), e.g. its schedule
    student: Any = field(default_factory=dict)
    #: the menu's methods, plus "global": `gkd` with the local terms off (fg, bg and soft weights 0), and
    #: "local-soft0.8": `local` with the soft-label weight 0.8 (what uniform robust weights of ~0.8 amount to)
    methods: tuple[str, ...] = ("none", "local", "robust", "gkd", "global", "pkd", "pkd+global", "local-soft0.8")
    seeds: tuple[int, ...] = (0, 1, 2, 3, 4)
    #: ablations on the `gkd` method (the default values are the main runs'), on ablation_seeds
    ablation_prototypes: tuple[int, ...] = (1, 5)
    ablation_global_weight: tuple[float, ...] = (1.0, 20.0)
    #: the student's BatchNorm while prototypes are made (the main runs: eval)
    ablation_bn_modes: tuple[str, ...] = ("batch",)
    #: prototypes refreshed every N steps (the main runs: every epoch of 100 steps)
    ablation_refresh_steps: tuple[int, ...] = (25,)
    ablation_seeds: tuple[int, ...] = (0, 1)
    #: positive control: a second teacher (same recipe and seed) trained on a defective copy of the training split,
    #: which the robust module should notice. "labels": control_fraction of class control_class's boxes get another
    #: class's label (a defect of the teacher's classifier); "blind": control_fraction of the boxes tagged
    #: control_tag (small, occluded, blurred) are deleted, so the teacher learns those objects as background (a defect
    #: of its features). control_fraction 0 = no control; control_class "" = the dataset's first class
    control: ControlKind = "labels"
    control_fraction: float = 0.5
    control_class: str = ""
    control_tag: str = "blurred"
    control_methods: tuple[str, ...] = ("local", "robust", "gkd")
    control_seeds: tuple[int, ...] = (0, 1, 2)
    #: the robust-weight audit (gkd.kd.distill.audit) of each teacher at the students' start: the first N training
    #: images (0 = all)
    audit_images: int = 0
    #: the power statement's assumption: the std over seeds of a paired mAP difference, in mAP points (the
    #: lineage-teacher variants measured 0.68 on 160 val images, docs/study_notes.md; 0.4 assumes it shrinks with the
    #: val split)
    design_sd: float = 0.4
    jobs: int = 2
    report: str = "docs/study.md"

    RANGES: ClassVar[dict] = {"synth_val_images": ((">=", 1),), "control_fraction": ((">=", 0), ("<=", 1)),
                              "design_sd": ((">", 0),), "jobs": ((">=", 1),), "student_init_epochs": ((">=", 0),),
                              "audit_images": ((">=", 0),)}

    @property
    def run_dir(self) -> Path:
        return Path(self.runs_dir) / self.name


#: ``--quick``: the same data and recipes on short schedules (teachers 3 epochs, initialisation 1, students 1),
#: `none`, `local` and `gkd` for one seed, and the positive control with `local` and `gkd`: a real but small study
QUICK_OVERRIDES = (
    "name=study-quick", "teacher.train.epochs=3", "teacher.train.steps=[2]", "student_init_epochs=1",
    "student.train.epochs=1", "methods=[none,local,gkd]", "seeds=[0]", "ablation_prototypes=[]",
    "ablation_global_weight=[]", "ablation_bn_modes=[]", "ablation_refresh_steps=[]", "control_methods=[local,gkd]",
    "control_seeds=[0]", "audit_images=300", "report=runs/study-quick/study.md",
)

#: the study's method names that are not menu entries: name -> (menu method, distill overrides). "local-soft0.8"
#: asks whether `robust` is only a smaller soft-label weight: the foreground loss is normalised by the sum of the
#: weights (uniform weights cancel there), while the soft-label loss is scaled by their mean (~0.8 in `robust`).
STUDY_METHODS = {"global": ("gkd", {"fg_weight": 0.0, "bg_weight": 0.0, "soft_weight": 0.0}),
                 "local-soft0.8": ("local", {"soft_weight": 0.8})}


def _run_name(method: str) -> str:
    return method.replace("+", "_")


def student_runs(cfg: StudyConfig, teacher_ckpt: Path, init_ckpt: Path | None,
                  control_ckpt: Path | None) -> list[tuple[str, Any, dict]]:
    """``(stage name, resolved run config, meta)`` of every student run: the main grid, the ablations, then the
    positive control's runs (the control teacher)."""
    from gkd.core.config import merge_dicts
    from gkd.kd.config import load_config
    from gkd.kd.distill.config import DistillRunConfig, teacher_section

    def teacher(path: Path) -> dict:
        # the study made (or was given) the teacher: its checkpoint records its own architecture
        return {"distill": {"teacher": teacher_section(path, trained_here=True)}}

    def method(m: str) -> dict:
        menu, extra = STUDY_METHODS.get(m, (m, {}))
        return {"distill": {"method": menu, **extra}}

    base = merge_dicts({
        "runs_dir": str(cfg.run_dir / "students"), "data": {"root": cfg.data_root}, "train": {"threads": 1},
        **({"model": {"weights": str(init_ckpt)}} if init_ckpt is not None else {})}, cfg.student)
    grid = [(f"{_run_name(m)}-s{seed}", seed, merge_dicts(teacher(teacher_ckpt), method(m)),
             {"kind": "main", "method": m, "seed": seed}) for seed in cfg.seeds for m in cfg.methods]
    gkd = merge_dicts(teacher(teacher_ckpt), method("gkd"))
    ablations = ([(f"gkd-protos{k}", {"pgm": {"num_prototypes": k}}, {"num_prototypes": k})
                  for k in cfg.ablation_prototypes] +
                 [(f"gkd-gw{w:g}", {"global_weight": w}, {"global_weight": w}) for w in cfg.ablation_global_weight] +
                 [(f"gkd-bn{b}", {"pgm": {"bn_mode": b}}, {"bn_mode": b}) for b in cfg.ablation_bn_modes] +
                 [(f"gkd-every{n}", {"pgm": {"interval_steps": n}}, {"refresh_steps": n})
                  for n in cfg.ablation_refresh_steps])
    for seed in cfg.ablation_seeds:
        grid += [(f"{name}-s{seed}", seed, merge_dicts(gkd, {"distill": extra}),
                  {"kind": "ablation", "method": "gkd", "seed": seed, "variant": name, **meta})
                 for name, extra, meta in ablations]
    if control_ckpt is not None:
        grid += [(f"control-{_run_name(m)}-s{seed}", seed, merge_dicts(teacher(control_ckpt), method(m)),
                  {"kind": "control", "method": m, "seed": seed})
                 for seed in cfg.control_seeds for m in cfg.control_methods]
    return [(name, load_config(cfg.student_config, cls=DistillRunConfig, key_prefix="student.",
                               updates=merge_dicts(merge_dicts(base, extra), {"name": name, "seed": seed})), meta)
            for name, seed, extra, meta in grid]


def check_grid(cfg: StudyConfig) -> None:
    """Refuse, before anything runs, a grid with an unknown method or without a seed."""
    from gkd.core.errors import GkdError
    from gkd.kd.distill.config import METHODS

    known = list(METHODS) + list(STUDY_METHODS)
    for key in ("methods", "control_methods"):
        bad = [m for m in getattr(cfg, key) if m not in known]
        if bad:
            raise GkdError(f"{key}: unknown method '{bad[0]}'; expected some of {', '.join(known)}")
    if not cfg.methods:
        raise GkdError("methods: empty; expected at least one method, e.g. methods=[none,gkd]")
    if not cfg.seeds:
        raise GkdError("seeds: empty; expected at least one seed, e.g. seeds=[0]")


@dataclass(frozen=True)
class StudyStageConfigs:
    """The resolved configs of the study's teachers (None where not trained: a given teacher, no initialisation,
    no control) and the control's defective split."""

    teacher: Any
    init: Any
    control: Any
    defect: Any  # gkd.kd.data.defects.DefectSpec, or None


def resolve_stage_configs(cfg: StudyConfig) -> StudyStageConfigs:
    """Check the grid and resolve every teacher's config before anything runs (one-line errors name the key)."""
    import os

    from gkd.core.config import load_config, merge_dicts
    from gkd.core.errors import GkdError
    from gkd.kd.config import RunConfig
    from gkd.kd.data.defects import DefectSpec

    if cfg.synth_val_images >= cfg.synth_images:
        raise GkdError(f"synth_val_images is {cfg.synth_val_images}; expected fewer than synth_images "
                       f"({cfg.synth_images}): the rest is the training split")
    check_grid(cfg)
    root = Path(cfg.data_root)
    fixed = {"runs_dir": str(cfg.run_dir), "data": {"root": cfg.data_root}}
    tcfg = None if cfg.teacher_checkpoint else load_config(
        cfg.teacher_config, cls=RunConfig, key_prefix="teacher.",
        updates=merge_dicts(cfg.teacher, {**fixed, "name": "teacher"}))
    icfg = None if cfg.student_init_epochs <= 0 else load_config(
        cfg.student_init_config, cls=RunConfig, key_prefix="student_init.", updates=merge_dicts(cfg.student_init, {
            **fixed, "name": "student-init",
            "train": {"epochs": cfg.student_init_epochs, "max_steps_per_epoch": None, "steps": []}}))
    if cfg.control_fraction <= 0 or not cfg.control_methods:
        return StudyStageConfigs(tcfg, icfg, None, None)
    control_json = cfg.run_dir / "control" / "train.json"
    ccfg = load_config(cfg.teacher_config, cls=RunConfig, key_prefix="teacher.", updates=merge_dicts(cfg.teacher, {
        **fixed, "name": "teacher-control", "data": {"root": cfg.data_root,
                                                     "train": os.path.relpath(control_json, root)}}))
    defect = DefectSpec(cfg.control, root / "train.json", control_json,
                        cfg.control_tag if cfg.control == "blind" else cfg.control_class, cfg.control_fraction,
                        cfg.data_seed)
    return StudyStageConfigs(tcfg, icfg, ccfg, defect)


def control_key(cfg: StudyConfig) -> dict[str, Any]:
    """What the control's defective split is keyed on (with the training split's SHA-256)."""
    if cfg.control == "blind":
        return {"control": "blind", "tag": cfg.control_tag, "fraction": cfg.control_fraction, "seed": cfg.data_seed}
    # the key of the first control ("labels"), unchanged so that its finished studies stay reusable
    return {"class": cfg.control_class, "fraction": cfg.control_fraction, "seed": cfg.data_seed}
