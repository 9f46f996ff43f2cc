"""Run configuration: one YAML file per run, validated into frozen dataclasses.

* Unknown keys and wrong types are rejected with a message naming the key and the allowed keys or values.
* Any key can be overridden from the command line as ``dotted.key=value`` (the value is parsed as YAML).
* A config may start with ``_base_: other.yaml`` (relative to itself); the file's keys override the base's.
* The resolved config (defaults filled in, overrides applied) is saved in the run folder as ``config.yaml``.

Sections are plain dataclasses; ``Literal`` fields list their allowed values. Other stages (distillation, export)
add their own sections by defining dataclasses and passing the root class to :func:`load_config`.
"""
from __future__ import annotations

import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal, Optional

from gkd.core import config as _core

__all__ = [
    "DataConfig", "ModelConfig", "TrainConfig", "EvalConfig", "RunConfig",
    "load_config",
    "ARCHS", "BACKBONES", "Arch", "Backbone", "SYNTH_PRESETS", "SynthPreset", "HARD_CASES",
]

#: the detector architectures and backbones: one definition, the type of the config fields and the tuples alike
Arch = Literal["faster_rcnn", "retinanet"]
Backbone = Literal["resnet18", "resnet34", "resnet50", "resnet101", "mobilenet_v3_large"]
ARCHS = typing.get_args(Arch)
BACKBONES = typing.get_args(Backbone)
#: the synthetic generator's worlds (``gkd.kd.data.synth.PRESETS`` holds what each draws)
SynthPreset = Literal["clean", "cluttered", "quick"]
SYNTH_PRESETS = typing.get_args(SynthPreset)
#: the synthetic generator's hard-case tags that reports give AP on (each box's ``attributes`` holds them, with more)
HARD_CASES = ("small", "occluded", "blurred")


@dataclass(frozen=True)
class DataConfig:
    """Where the COCO-format data lives. Relative paths are relative to ``root``."""

    RANGES: ClassVar[dict] = {"num_workers": ((">=", 0),)}

    root: str = "data/synth"
    train: str = "train.json"
    val: str = "val.json"
    images: str = "images"
    num_workers: int = 0
    #: images without any (non-crowd) box are kept for training (they teach the background)
    keep_empty: bool = True

    def path(self, name: str) -> Path:
        p = Path(getattr(self, name))
        return p if p.is_absolute() else Path(self.root) / p


@dataclass(frozen=True)
class ModelConfig:
    """A torchvision detector with an FPN. ``num_classes`` is taken from the dataset when 0."""

    RANGES: ClassVar[dict] = {
        "num_classes": ((">=", 0),), "min_size": ((">=", 16),), "max_size": ((">=", 16),),
        "anchor_sizes": ((">", 0),), "backbone_width": ((">", 0), ("<=", 4)), "fpn_channels": ((">=", 1),),
        "box_head_dim": ((">=", 1),),
        "rois_per_image": ((">=", 1),), "proposals_test": ((">=", 1),), "proposals_train": ((">=", 1),),
        "score_thresh": ((">=", 0), ("<", 1)), "detections_per_img": ((">=", 1),)}

    arch: Arch = "faster_rcnn"
    backbone: Backbone = "resnet50"
    num_classes: int = 0
    #: shorter / longer image side after the detector's internal resize (aspect kept)
    min_size: int = 320
    max_size: int = 320
    #: backbone normalisation: "bn" (BatchNorm, learns from scratch: the default, as no pretrained weights exist
    #: here) or "frozen_bn" (torchvision's choice for fine-tuning pretrained weights; from random init it means
    #: no normalisation at all and deep backbones such as ResNet-50 train poorly)
    norm: Literal["bn", "frozen_bn"] = "bn"
    #: ResNet stage widths x this (torchvision's 64/128/256/512 at 1.0, rounded to multiples of 8). 0.5 gives a
    #: ResNet with ~1/4 of the backbone's compute: the deployable student. Other values than 1.0 are ResNet-only
    #: and cannot load torchvision's weights (their shapes differ)
    backbone_width: float = 1.0
    #: backbone stages that train (0..5 for ResNet, 0..6 for MobileNetV3)
    trainable_layers: int = 5
    #: anchor size per FPN level, finest first (empty = torchvision's 32..512); small inputs want smaller anchors
    anchor_sizes: tuple[int, ...] = ()
    #: FPN width (torchvision: 256; ResNet backbones only). The FPN, RPN head and box head dominate the cost of a
    #: training step on small images, and all scale with it: 128 is ~2x cheaper on the synthetic data
    fpn_channels: int = 256
    #: Faster R-CNN: width of the box head's two fully connected layers (torchvision: 1024)
    box_head_dim: int = 1024
    #: initial weights: a torchvision-format state dict or a gkd checkpoint (path), or null for random init
    weights: Optional[str] = None
    #: Faster R-CNN: RoIs sampled per image for the box head in training (torchvision/mmdet: 512, 25% positive);
    #: the box head's cost is linear in it, and small images with few objects need far fewer
    rois_per_image: int = 512
    #: Faster R-CNN: RPN proposals kept after NMS at test time (torchvision: 1000); the box head's cost at inference
    #: is linear in it, and images with a handful of objects lose nothing at 300
    proposals_test: int = 1000
    #: Faster R-CNN: RPN proposals kept per level before NMS and in all after it, in training (torchvision: 2000);
    #: the box head samples ``rois_per_image`` of them, and NMS over 2000 boxes is ~12% of a CPU training step
    proposals_train: int = 2000
    #: detections kept per image and score threshold at inference (COCO protocol: low threshold, 100 boxes)
    score_thresh: float = 0.05
    detections_per_img: int = 100


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation schedule. Iteration-based warmup, epoch-based step or cosine decay."""

    RANGES: ClassVar[dict] = {
        "epochs": ((">=", 1),), "batch_size": ((">=", 1),), "lr": ((">", 0),), "momentum": ((">=", 0), ("<", 1)),
        "weight_decay": ((">=", 0),), "warmup_iters": ((">=", 0),), "warmup_ratio": ((">", 0), ("<=", 1)),
        "steps": ((">=", 0),), "gamma": ((">", 0),), "grad_clip": ((">", 0),), "hflip": ((">=", 0), ("<=", 1)),
        "eval_interval": ((">=", 0),), "max_steps_per_epoch": ((">=", 1),), "threads": ((">=", 0),),
        "base_batch_size": ((">=", 1),), "dist_timeout_s": ((">=", 1),)}

    epochs: int = 12
    batch_size: int = 4
    optimizer: Literal["sgd", "adamw"] = "sgd"
    lr: float = 0.02
    momentum: float = 0.9
    weight_decay: float = 1e-4
    warmup_iters: int = 100
    warmup_ratio: float = 0.001
    schedule: Literal["step", "cosine"] = "step"
    #: epochs (0-based, at their start) where the step schedule multiplies the lr by ``gamma``
    steps: tuple[int, ...] = (8, 11)
    gamma: float = 0.1
    #: max gradient L2 norm, or null for no clipping
    grad_clip: Optional[float] = None
    #: mixed precision; only used on CUDA
    amp: bool = True
    device: Literal["auto", "cpu", "cuda"] = "auto"
    hflip: float = 0.5
    #: evaluate on the val split every N epochs (and always after the last); 0 = never in the loop: the caller
    #: evaluates the checkpoint itself (``gkd study`` does, with its subsets, so each run is evaluated once)
    eval_interval: int = 1
    #: cap on steps per epoch (null = whole split); useful for smoke runs
    max_steps_per_epoch: Optional[int] = None
    #: CPU threads for torch; 0 = auto: the cores available less what other processes use when the run starts
    #: (gkd/kd/cpu_share.py: 2 threads beside a busy process run 2.7x slower than alone, 1 thread does not)
    threads: int = 0
    # --- many processes (torchrun; see docs/distributed.md). ``batch_size`` is per process: the global batch is
    # world_size x batch_size. None of these keys changes a single-process run.
    #: "linear": the linear scaling rule, lr x world_size x batch_size / base_batch_size; "none": lr as given
    lr_scaling: Literal["none", "linear"] = "none"
    #: the global batch ``lr`` was tuned for (used by lr_scaling=linear only)
    base_batch_size: int = 16
    #: SyncBatchNorm in the student (GPUs only): batch statistics over all ranks' images instead of each rank's
    sync_bn: bool = False
    #: DDP's find_unused_parameters: only for a model with parameters that get no gradient in some steps (gkd's
    #: detectors and adapters use every trainable parameter in every step, so it stays off: it costs a graph walk)
    find_unused_parameters: bool = False
    #: process-group backend: auto = NCCL when the run is on CUDA, else Gloo
    dist_backend: Literal["auto", "nccl", "gloo"] = "auto"
    #: seconds a collective may wait for the other ranks before the job stops (a dead or stuck rank);
    #: $GKD_DIST_TIMEOUT_S overrides it
    dist_timeout_s: int = 1800


@dataclass(frozen=True)
class EvalConfig:
    """COCO evaluation protocol (kept identical for every backend)."""

    RANGES: ClassVar[dict] = {"batch_size": ((">=", 1),), "max_dets": ((">=", 1),)}

    batch_size: int = 4
    #: pycocotools maxDets for AP (raise it for images with more than 100 objects)
    max_dets: int = 100


@dataclass(frozen=True)
class RunConfig:
    """A training run: ``runs/<name>/`` holds its config, checkpoints and metrics."""

    RANGES: ClassVar[dict] = {"seed": ((">=", 0),)}

    name: str = "run"
    seed: int = 0
    runs_dir: str = "runs"
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    @property
    def run_dir(self) -> Path:
        return Path(self.runs_dir) / self.name


def load_config(path: str | Path | None, overrides: list[str] | tuple[str, ...] = (), cls: type = RunConfig,
                **kwargs: Any) -> Any:
    """:func:`gkd.core.config.load_config` with a training run's :class:`RunConfig` as the default root."""
    return _core.load_config(path, overrides, cls=cls, **kwargs)
