"""The export stage of ``gkd run``: ``gkd export`` of one trained student, as a typed spec and a frozen result."""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gkd.core.records import Artifact, result_fields

__all__ = ["ExportSpec", "ExportedFile", "ExportedModel", "export_stage"]

log = logging.getLogger("gkd")

#: the INT8 file's details the report shows (from its export manifest, read back from the file)
INT8_DETAILS = ("is_int8", "floor", "macs_int8_share", "weights_int8_share", "counts", "activations", "weights",
                "bias", "blocking")
#: the export manifest's sections the report shows beside the files
DETAILS = (("speed", "speed"), ("tensorrt", "tensorrt"), ("tensorrt_rtx", "tensorrt_rtx_check"),
           ("trtexec", "trtexec"), ("tensorrt_profile", "tensorrt_profile"))


@dataclass(frozen=True)
class ExportSpec:
    """What to export and where. ``shipped``: the student that ships also gets the static, TensorRT-ready graph and
    its TensorRT-RTX parse/build check; a student that is only compared (the baseline) gets the onnxruntime files
    (its graph is the shipped one's: building it twice on a CPU costs a minute)."""

    checkpoint: Path
    out: Path
    precisions: tuple[str, ...]
    data_root: Path
    int8_target: float
    seed: int
    shipped: bool = True


@dataclass(frozen=True)
class ExportedFile:
    onnx: Artifact
    verified: bool | None


@dataclass(frozen=True)
class ExportedModel:
    """The exported files per precision (each with its parity verdict) and the export manifest's details."""

    dir: Path
    files: dict[str, ExportedFile]
    details: dict = field(default_factory=dict)

    def record(self) -> dict[str, Any]:
        files = {p: {"onnx": f.onnx.record(), "verified": f.verified} for p, f in self.files.items()}
        return {"dir": str(self.dir), "outputs": {"files": files}, **self.details}

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> "ExportedModel":
        files = {p: ExportedFile(Artifact.from_record(f["onnx"]), f["verified"])
                 for p, f in record["outputs"]["files"].items()}
        details = result_fields(record, "dir", "outputs")
        return cls(Path(record["dir"]), files, details)


def export_stage(spec: ExportSpec) -> ExportedModel:
    """``gkd export`` of ``spec.checkpoint`` into ``spec.out`` (INT8 calibrated on the training split, every file's
    parity and mAP checked on the val split)."""
    from .pipeline import ExportOptions, export_checkpoint

    data = Path(spec.data_root)
    manifest = export_checkpoint(ExportOptions(checkpoint=spec.checkpoint, out=spec.out, precisions=spec.precisions,
                                               calib_data=data / "train.json", val_data=data / "val.json",
                                               int8_target=spec.int8_target, seed=spec.seed, static=spec.shipped,
                                               tensorrt_rtx="auto" if spec.shipped else "off"),
                                 log=log.info)
    files = {p: ExportedFile(Artifact.of(spec.out / f["onnx"]), f["verified"]) for p, f in manifest["files"].items()}
    int8 = (manifest["files"].get("int8") or {}).get("details") or {}
    details = {"parity": manifest["parity"]["results"],
               "int8": {k: int8.get(k) for k in INT8_DETAILS} if int8 else None,
               **{name: manifest.get(section) for name, section in DETAILS}}
    return ExportedModel(spec.out, files, details)
