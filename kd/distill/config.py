"""Configuration of a distillation run: ``DistillRunConfig`` = ``RunConfig`` + a ``distill`` section.

The defaults are the values of the authors' released Faster R-CNN COCO config (see ``docs/distill.md``), with the
decisions of ``docs/method.md`` section 3 (global loss on, weight 5, attenuated). ``cfg.model`` describes the student;
``cfg.distill.teacher`` names the teacher checkpoint and, optionally, the architecture it must have.
"""
from __future__ import annotations

import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar, Literal, Optional

from ..config import Arch, Backbone, RunConfig

__all__ = ["METHODS", "TeacherConfig", "PGMConfig", "DistillConfig", "QuantConfig", "DistillRunConfig",
           "method_parts", "resolve_scale", "uses_prototypes", "teacher_section"]

#: the method menu (``distill.method``): one definition for the field's type and the tuple
Method = Literal["none", "local", "robust", "gkd", "pkd", "pkd+global"]
METHODS = typing.get_args(Method)


@dataclass(frozen=True)
class TeacherConfig:
    """The frozen teacher.

    ``checkpoint`` is a gkd checkpoint (``runs/<teacher>/checkpoints/best.pt``) or a torchvision-format state dict.
    ``arch`` / ``backbone`` declare what the checkpoint must be: for a gkd checkpoint they are checked against its
    record (null: accept what it says); a plain state dict carries no architecture, so both are required then.
    """

    checkpoint: Optional[str] = None
    arch: Optional[Arch] = None
    backbone: Optional[Backbone] = None
    #: anchor sizes of a plain-state-dict teacher (gkd checkpoints record their own); empty = torchvision's
    anchor_sizes: tuple[int, ...] = ()


def teacher_section(checkpoint: str | Path, trained_here: bool) -> dict:
    """The ``distill.teacher`` section for a teacher checkpoint. A teacher gkd trained (``trained_here``) is a gkd
    checkpoint that records its own architecture: ``arch`` and ``backbone`` are null (take what it says), not the
    config's defaults; a given checkpoint keeps the config's declaration (a plain state dict needs one)."""
    return {"checkpoint": str(checkpoint), **({"arch": None, "backbone": None} if trained_here else {})}


@dataclass(frozen=True)
class PGMConfig:
    """Prototype Generation Module (docs/method.md, section 2.2)."""

    RANGES: ClassVar[dict] = {
        "num_prototypes": ((">=", 1),), "min_box_size": ((">=", 0),), "max_images_per_class": ((">=", 1),),
        "alpha": ((">=", 0),), "density_bandwidth": ((">", 0),), "density_percentile": ((">=", 0), ("<=", 1)),
        "interval": ((">=", 1),), "interval_steps": ((">=", 1),), "batch_size": ((">=", 1),), "seed": ((">=", 0),)}

    #: prototypes per class per level (fewer for classes with fewer density-filtered instances)
    num_prototypes: int = 10
    #: a GT box is a candidate only if its width and height (original image pixels) are strictly above this;
    #: null = the reference's 30 px scaled to the input size: ``30 * model.min_size / 800`` (30 at COCO's 800 px,
    #: 6 at 160 px), see :func:`resolve_scale`
    min_box_size: Optional[float] = None
    #: at most this many images per class, sampled once (seeded) and kept for every refresh
    max_images_per_class: int = 800
    #: joint matching pursuit: weight of the coefficient-agreement term
    alpha: float = 10.0
    #: density filter: bandwidth of exp(-(d / bw)^2) on cosine distances, and the percentile of the lower bound
    density_bandwidth: float = 0.1
    density_percentile: float = 0.4
    #: refresh the prototypes every N epochs (from the live student, no_grad)
    interval: int = 1
    #: refresh every N training steps instead (the first refresh is still before step 0); null = by epochs
    interval_steps: Optional[int] = None
    #: the student's BatchNorm during a refresh: "eval" (running statistics, the reference) or "batch" (each
    #: refresh batch's own statistics, as the training step's features have; running statistics left untouched)
    bn_mode: Literal["eval", "batch"] = "eval"
    #: images per forward pass during a refresh
    batch_size: int = 8
    #: seed of the per-class image sampling (null = the run's seed)
    seed: Optional[int] = None


@dataclass(frozen=True)
class DistillConfig:
    """Which distillation and its weights (defaults: the released config + docs/method.md, section 3)."""

    RANGES: ClassVar[dict] = {
        "strides": ((">", 0),), "level_canonical_size": ((">", 0),), "fg_weight": ((">=", 0),), "bg_weight": ((">=", 0),), "soft_weight": ((">=", 0),),
        "temperature": ((">", 0),), "global_weight": ((">=", 0),), "pkd_weight": ((">=", 0),)}

    method: Method = "gkd"
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    pgm: PGMConfig = field(default_factory=PGMConfig)
    #: FPN strides to distill (empty = every stride both detectors have)
    strides: tuple[int, ...] = ()
    #: the level rule's canonical box size (model-input pixels): a box of side s goes to distilled level
    #: floor(log2(s / canonical)), clamped; null = mmdet's 56 px at 800 px scaled to the input size:
    #: ``56 * model.min_size / 800`` (56 on COCO, 11.2 at 160 px, where 56 would put every box under 112 px on the
    #: finest level)
    level_canonical_size: Optional[float] = None
    #: adapter kernel: 3 (the method: 3x3 conv, padding 1) or 1 (a 1x1 conv: ~9x cheaper, not the method)
    adapter_kernel: Literal[1, 3] = 3
    #: decoupled feature imitation: foreground (robust-weighted) and background weights
    fg_weight: float = 1.0
    bg_weight: float = 4.0
    #: soft-label KL on positive RoIs / anchors, and its temperature
    soft_weight: float = 1.0
    temperature: float = 2.0
    #: global-knowledge loss (cosine-similarity vectors against all prototypes of a level)
    global_weight: float = 5.0
    #: PKD (Pearson-correlation feature imitation) weight; null = mmrazor's value (6 Faster R-CNN, 10 RetinaNet)
    pkd_weight: Optional[float] = None
    #: multiply the feature and global losses by 1 - epoch / epochs (not the soft-label loss)
    attenuation: bool = True
    #: log the global discrepancy (the unweighted global loss, no gradient) as ``kd_global_discrepancy`` in methods
    #: without the global term too (``local``, ``robust``, ``pkd``): their runs then build prototypes as well
    monitor_global: bool = False


@dataclass(frozen=True)
class QuantConfig:
    """Quantization-aware training of the student (``gkd.kd.fake_quant``): off when ``int8_format`` is null.

    With a format, the student (usually ``model.weights=`` a trained FP32 student) is calibrated as post-training
    quantization would be (MinMax on ``calib_images`` training images), then trains with fake INT8 in that format:
    with a teacher this is quantization-aware distillation (QAD), with ``distill.method=none`` plain QAT. Its
    checkpoints carry the learned scales; ``gkd export`` writes the INT8 file from them, without recalibration.
    """

    RANGES: ClassVar[dict] = {"calib_images": ((">=", 1),)}

    int8_format: Optional[Literal["tensorrt", "onnxruntime"]] = None
    calib_images: int = 64
    #: a distillation run's ``last.pt`` (usually the FP32 student's own) whose adapters start this run's, so that a
    #: short quantization-aware fine-tune is not driven by freshly initialised adapters; null: new adapters
    adapters_from: Optional[str] = None


@dataclass(frozen=True)
class DistillRunConfig(RunConfig):
    """A ``gkd distill`` run: the student in ``model``, the teacher and method in ``distill``, quantization-aware
    training in ``quant``."""

    name: str = "distill"
    distill: DistillConfig = field(default_factory=DistillConfig)
    quant: QuantConfig = field(default_factory=QuantConfig)


@dataclass(frozen=True)
class MethodParts:
    """What a menu entry switches on."""

    teacher: bool      # the teacher runs at all
    local: bool        # decoupled fg/bg imitation + soft labels
    robust: bool       # robust weights on the local terms (needs prototypes)
    global_: bool      # global-knowledge loss (needs prototypes)
    pkd: bool          # Pearson-correlation imitation

    @property
    def prototypes(self) -> bool:
        return self.robust or self.global_


def method_parts(method: str) -> MethodParts:
    """The switches of a ``distill.method`` value."""
    table = {
        "none": MethodParts(False, False, False, False, False),
        "local": MethodParts(True, True, False, False, False),
        "robust": MethodParts(True, True, True, False, False),
        "gkd": MethodParts(True, True, True, True, False),
        "pkd": MethodParts(True, False, False, False, True),
        "pkd+global": MethodParts(True, False, False, True, True),
    }
    return table[method]


#: the reference's input scale (COCO: short side 800) at which its pixel constants (56, 30) hold
REFERENCE_MIN_SIZE = 800


def resolve_scale(cfg: DistillConfig, min_size: int) -> DistillConfig:
    """``cfg`` with the scale-dependent defaults filled in for inputs of short side ``min_size`` (``model.min_size``):
    ``level_canonical_size`` = 56 x min_size / 800, ``pgm.min_box_size`` = 30 x min_size / 800. Set values stay."""
    import dataclasses

    scale = float(min_size) / REFERENCE_MIN_SIZE
    canonical = cfg.level_canonical_size if cfg.level_canonical_size is not None else 56.0 * scale
    min_box = cfg.pgm.min_box_size if cfg.pgm.min_box_size is not None else 30.0 * scale
    return dataclasses.replace(cfg, level_canonical_size=canonical,
                               pgm=dataclasses.replace(cfg.pgm, min_box_size=min_box))


def uses_prototypes(cfg: DistillConfig) -> bool:
    """The run builds prototypes: its method needs them, or the global discrepancy is monitored."""
    parts = method_parts(cfg.method)
    return parts.prototypes or (cfg.monitor_global and parts.teacher)
