"""Checkpoints: written atomically, loaded with ``torch.load(weights_only=True)`` (nothing we load executes code).

A gkd checkpoint is a dict of tensors and plain Python values::

    {"format": "gkd-checkpoint", "version": 1,
     "kind": "detector",                 # a bare detector: what `gkd eval` and `gkd export` take
     "model_config": {...},              # ModelConfig as a dict, num_classes filled in
     "classes": ["circle", ...],         # class names, index i -> label i + 1
     "category_ids": [1, 2, ...],        # COCO category id of each class (same order)
     "model": state_dict,
     "fake_quant": {"format": ..., "points": [...]},  # a quantization-aware student only (gkd.kd.fake_quant):
                                        # its learned scales are in "model" under gkd_fake_quant.*
     # training state, present in run checkpoints only:
     "epoch": int, "optimizer": ..., "scheduler": ..., "scaler": ..., "rng": {...}, "config": {...},
     "metrics": {...}, "extra": {...},   # extra: stage-specific state (e.g. distillation adapters, prototypes)
     # run checkpoints of a torchrun job only (kd/distributed.py): the process count and every rank's RNG state
     "world_size": int, "rng_ranks": [{...}, ...]}

``load_detector`` also accepts a torchvision-format state dict (the file torchvision's model zoo ships, or
``torch.save(model.state_dict())``) when the caller supplies the architecture.
"""
from __future__ import annotations

import dataclasses
import zipfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from gkd.core.config import from_dict, to_dict
from gkd.core.errors import GkdError
from gkd.core.io import atomic_torch_save

from .config import ModelConfig

__all__ = ["FORMAT", "VERSION", "save_checkpoint", "load_checkpoint", "load_detector", "load_state_into",
           "detector_checkpoint", "detector_weights", "is_gkd_checkpoint"]

FORMAT = "gkd-checkpoint"
VERSION = 1


def detector_checkpoint(model: nn.Module, model_cfg: ModelConfig, classes: list[str],
                        category_ids: list[int]) -> dict[str, Any]:
    """The minimal checkpoint of a bare detector (what eval/export need)."""
    from .fake_quant import fake_quant_state

    cfg = dataclasses.replace(model_cfg, num_classes=len(classes), weights=None)
    ckpt = {"format": FORMAT, "version": VERSION, "kind": "detector", "model_config": to_dict(cfg),
            "classes": list(classes), "category_ids": [int(c) for c in category_ids],
            "model": {k: v.detach().cpu() for k, v in model.state_dict().items()}}
    state = fake_quant_state(model)
    if state is not None:
        ckpt["fake_quant"] = state.layout()
    return ckpt


def save_checkpoint(ckpt: dict[str, Any], path: str | Path) -> Path:
    """Atomically write a checkpoint dict (temporary file + rename)."""
    return atomic_torch_save(ckpt, path)


#: what :func:`load_checkpoint` can require of a file: a detector (eval, export, predict, bench, a teacher, initial
#: weights) or a run's full training state (``--resume``)
NEEDS = ("detector", "run")


def load_checkpoint(path: str | Path, need: str | None = None) -> dict[str, Any]:
    """Read any ``.pt`` file safely (``weights_only=True``): the one reader of checkpoints, so that every command
    applies the same checks.

    Checks, each a one-line GkdError naming the file: it exists and is a torch file; a gkd checkpoint's format
    version is one this gkd understands; and what ``need`` asks for is there:

    - ``"detector"``: a gkd checkpoint holding ``model`` and ``model_config``, or a plain state dict of tensors
      (torchvision format: the caller supplies the architecture);
    - ``"run"``: a gkd run checkpoint (``last.pt``) with the training state ``--resume`` continues from.

    Returns:
        The checkpoint dict.
    """
    path = Path(path)
    if need is not None and need not in NEEDS:
        raise ValueError(f"need must be one of {NEEDS} or None, got {need!r}")
    if not path.is_file():
        raise GkdError(f"{path}: checkpoint not found")
    with open(path, "rb") as f:
        head = f.read(4)
    # torch.save writes a zip archive (b"PK\x03\x04"); files of torch < 1.6 are a pickle (b"\x80")
    if not head.startswith((b"PK\x03\x04", b"\x80")):
        raise GkdError(f"{path}: not a torch checkpoint (expected a file written by torch.save; this one starts with "
                       f"{head!r})")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, zipfile.BadZipFile, ValueError) as exc:
        msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise GkdError(f"{path}: not a readable checkpoint (corrupt, truncated, or not a torch file): {msg}") from None
    except Exception as exc:  # weights_only refuses pickled code: that is a user-input problem too
        msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise GkdError(f"{path}: refused to load (only tensors and plain values are allowed): {msg}") from None
    if not isinstance(obj, dict):
        raise GkdError(f"{path}: expected a checkpoint dict or a state dict, got {type(obj).__name__}")
    if is_gkd_checkpoint(obj):
        _check_gkd_content(obj, path, need)
    elif need == "run":
        raise GkdError(f"{path}: not a resumable gkd run checkpoint (a gkd run writes checkpoints/last.pt)")
    elif need == "detector":
        detector_weights(obj, path)
    return obj


def _check_gkd_content(ckpt: dict, path: Path, need: str | None) -> None:
    version = ckpt.get("version")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise GkdError(f"{path}: gkd checkpoint with format version {version!r}; expected an integer from 1 to "
                       f"{VERSION}")
    if version > VERSION:
        raise GkdError(f"{path}: checkpoint format version {version} is newer than this gkd understands "
                       f"({VERSION}); upgrade gkd")
    if need in ("detector", "run"):
        if not isinstance(ckpt.get("model"), dict) or not isinstance(ckpt.get("model_config"), dict):
            raise GkdError(f"{path}: gkd checkpoint of kind '{ckpt.get('kind')}' holds no detector (expected "
                           f"'model' and 'model_config')")
        detector_weights(ckpt, path)
    if need == "run":
        missing = [k for k in ("epoch", "config", "optimizer", "scheduler", "rng") if k not in ckpt]
        if ckpt.get("kind") != "run" or missing:
            what = f"lacks {', '.join(missing)}" if missing else f"is of kind '{ckpt.get('kind')}'"
            raise GkdError(f"{path}: not a resumable gkd run checkpoint (it {what}; a run's checkpoints/last.pt "
                           f"holds its training state)")


def detector_weights(ckpt: dict, path: str | Path) -> dict[str, torch.Tensor]:
    """The detector's state dict inside a checkpoint: a gkd checkpoint's ``model``, or the file itself (or its
    ``model`` entry) when it is a plain state dict; a one-line GkdError when it is not a dict of tensors."""
    from .fake_quant import STATE_NAME

    state = ckpt["model"] if isinstance(ckpt.get("model"), dict) else ckpt
    if not state or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()):
        raise GkdError(f"{path}: not a state dict of tensors (and not a gkd checkpoint holding one)")
    # a quantization-aware student's weights initialise a float detector; its scales belong to its own layout
    return {k: v for k, v in state.items() if not k.startswith(STATE_NAME + ".")}


def is_gkd_checkpoint(obj: dict) -> bool:
    return obj.get("format") == FORMAT


def load_state_into(model: nn.Module, state: dict[str, torch.Tensor], source: str, arch: str, *,
                    classes: list[str] | None = None, teacher: bool = False) -> str:
    """Load ``state`` into ``model`` strictly, explaining architecture or class-count mismatches in one line.

    torchvision COCO weights (91 class slots) are cut to ``classes`` when those are COCO categories; otherwise
    their class heads are re-initialised, or refused for a ``teacher`` (see :mod:`gkd.kd.models.coco_transfer`).

    Returns:
        A one-line transfer report ("transferred N of M tensors; re-initialised: ...") or "" for a plain load.
    """
    from .models.coco_transfer import COCO_HEAD_KEYS, remap_coco_heads
    from .models.detectors import head_parameter_prefixes

    own = model.state_dict()
    state, report = remap_coco_heads(state, arch, classes, source, teacher=teacher)
    fresh = {k for k in COCO_HEAD_KEYS[arch] if k in own and k not in state} if report else set()
    if not any(k in own for k in state):
        # A classification backbone (e.g. torchvision resnet50 ImageNet weights): map into backbone.body.
        body = {f"backbone.body.{k}": v for k, v in state.items() if f"backbone.body.{k}" in own}
        if body and len(body) >= 0.9 * len([k for k in state if not k.startswith("fc.")]):
            _check_shapes(own, body, source, arch)
            model.load_state_dict(body, strict=False)
            return
        raise GkdError(f"{source}: none of its {len(state)} weights belong to a {arch} detector "
                       f"(first key '{next(iter(state), '')}')")
    # BatchNorm's step counter is absent from torchvision-format (FrozenBatchNorm) weights; it carries no weights.
    missing = [k for k in own if k not in state and not k.endswith("num_batches_tracked") and k not in fresh]
    unexpected = [k for k in state if k not in own]
    if missing or unexpected:
        what = f"missing '{missing[0]}'" if missing else f"unexpected '{unexpected[0]}'"
        raise GkdError(f"{source}: weights do not fit this architecture ({len(missing)} missing, "
                       f"{len(unexpected)} unexpected, e.g. {what}); check model.arch / model.backbone")
    heads = head_parameter_prefixes(arch)
    for k, v in state.items():
        # a head's first dimension counts classes; another input width is an FPN / box head width difference
        if k.startswith(heads) and v.dim() and own[k].dim() and v.shape[0] != own[k].shape[0]:
            raise GkdError(f"{source}: class count differs: '{k}' has shape {tuple(v.shape)}, this model expects "
                           f"{tuple(own[k].shape)} (dataset classes + background)")
    _check_shapes(own, state, source, arch)
    model.load_state_dict(state, strict=not any(k not in state for k in own))
    return report


def _check_shapes(own: dict, state: dict, source: str, arch: str) -> None:
    for k, v in state.items():
        if own[k].shape != v.shape:
            raise GkdError(f"{source}: '{k}' has shape {tuple(v.shape)}, the {arch} model expects "
                           f"{tuple(own[k].shape)}; check model.arch / model.backbone / model.backbone_width / "
                           f"model.fpn_channels / model.box_head_dim")


def load_detector(path: str | Path, model_cfg: ModelConfig | None = None,
                  num_classes: int | None = None) -> tuple[nn.Module, dict[str, Any]]:
    """Build a detector and load weights from a gkd checkpoint or a torchvision-format state dict.

    Args:
        path: the checkpoint file.
        model_cfg: required for a plain state dict (it has no architecture record); for a gkd checkpoint, if given,
            its arch/backbone/num_classes must agree with the checkpoint's.
        num_classes: dataset class count for a plain state dict.

    Returns:
        ``(model, info)`` with the model in eval mode on CPU and ``info`` holding ``model_config`` (a ModelConfig),
        ``classes`` and ``category_ids`` (None for a plain state dict) and the raw checkpoint dict as ``checkpoint``.
    """
    from .models.detectors import build_detector

    ckpt = load_checkpoint(path, need="detector")
    if is_gkd_checkpoint(ckpt):
        cfg = from_dict(ModelConfig, ckpt["model_config"], f"{path} (model_config)")
        if model_cfg is not None:
            for key in ("arch", "backbone"):
                if getattr(model_cfg, key) != getattr(cfg, key):
                    raise GkdError(f"{path}: checkpoint is a {cfg.arch}/{cfg.backbone} model, the config declares "
                                   f"{model_cfg.arch}/{model_cfg.backbone} (model.{key})")
            if num_classes is not None and num_classes != cfg.num_classes:
                raise GkdError(f"{path}: checkpoint has {cfg.num_classes} classes, the dataset has {num_classes}")
            # sizes and thresholds may legitimately differ (e.g. evaluate at another size)
            cfg = dataclasses.replace(model_cfg, num_classes=cfg.num_classes, weights=None)
        model = build_detector(cfg)
        if ckpt.get("fake_quant"):  # the student as it trained: fake INT8 with its learned scales
            from .fake_quant import install_fake_quant

            install_fake_quant(model, ckpt["fake_quant"])
        load_state_into(model, ckpt["model"], str(path), cfg.arch)
        info = {"model_config": cfg, "classes": ckpt.get("classes"), "category_ids": ckpt.get("category_ids"),
                "checkpoint": ckpt}
    else:
        if model_cfg is None:
            raise GkdError(f"{path}: a plain state dict carries no architecture; give model.arch and model.backbone")
        k = num_classes if num_classes is not None else model_cfg.num_classes
        cfg = dataclasses.replace(model_cfg, num_classes=k, weights=None)
        model = build_detector(cfg)
        load_state_into(model, detector_weights(ckpt, path), str(path), cfg.arch)
        info = {"model_config": cfg, "classes": None, "category_ids": None, "checkpoint": None}
    model.eval()
    return model, info
