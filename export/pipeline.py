"""``gkd export`` as a library call: checkpoint -> ONNX (FP32/FP16/INT8) -> parity on real images -> engines.

Nothing is called good before it has been run: every ONNX written is executed with onnxruntime on real images and
compared with the PyTorch checkpoint (:mod:`gkd.export.parity`); the manifest marks a file ``verified`` only then.
"""
from __future__ import annotations

import dataclasses
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from gkd.kd.errors import GkdError
from gkd.kd.io import atomic_write_json, atomic_write_text

from ._lazy import has_module
from .adapters import preprocess_contract
from .onnx import DEFAULT_OPSET, EXPORTER, export_onnx, file_sha256, load_onnx, save_onnx
from .parity import DEFAULT_TOLERANCES, Tolerances, collect_outputs, coco_map, compare_outputs, format_table

__all__ = ["ExportOptions", "export_checkpoint", "PRECISIONS", "check_output_dir", "check_label_space"]

PRECISIONS = ("fp32", "fp16", "int8")


@dataclass(frozen=True)
class ExportOptions:
    """What ``gkd export`` does (one field per command-line option; see ``gkd export --help``)."""

    checkpoint: Path
    out: Path
    precisions: tuple[str, ...] = ("fp32",)
    calib_data: Path | None = None
    val_data: Path | None = None
    calib_images: int = 64
    calib_method: str = "minmax"
    parity_images: int = 16
    opset: int = DEFAULT_OPSET
    min_shapes: str | None = None
    opt_shapes: str | None = None
    max_shapes: str | None = None
    tolerance_overrides: dict[str, Any] = field(default_factory=dict)
    int8_target: float = 0.99
    tensorrt: str = "auto"  # auto | off | on
    workspace_gib: float = 4.0
    tensorrt_rtx: str = "auto"  # auto | off | on: the TensorRT-RTX parse/build check (export/trt_rtx.py)
    threads: int = 1
    seed: int = 0


def check_output_dir(out: Path) -> None:
    """Fail early (before any work) when ``out`` cannot hold files; creates it if needed."""
    from gkd.kd.io import ensure_writable_folder

    ensure_writable_folder(out, "output folder")


def _versions() -> dict[str, str]:
    import onnx
    import onnxruntime
    import torchvision

    return {"torch": torch.__version__, "torchvision": torchvision.__version__, "onnx": onnx.__version__,
            "onnxruntime": onnxruntime.__version__, "python": platform.python_version()}


def export_checkpoint(opts: ExportOptions, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Run the whole export. Returns the manifest (also written to ``out/export.json``).

    Raises:
        GkdError: bad input (checked before anything is written) or a failed step.
    """
    from gkd.kd.checkpoint import load_detector

    from .images import load_image_set
    from .runtime import OrtRunner, TorchRunner

    bad = [p for p in opts.precisions if p not in PRECISIONS]
    if bad or not opts.precisions:
        raise GkdError(f"--precision: unknown precision '{bad[0] if bad else ''}'; expected a comma-separated list "
                       f"of {', '.join(PRECISIONS)}")
    if "int8" in opts.precisions and opts.calib_data is None:
        raise GkdError("--precision int8 needs --calib-data DATA.json (real images to calibrate on)")
    if opts.calib_data is None and opts.val_data is None:
        raise GkdError("parity needs real images: give --val-data DATA.json (or --calib-data); an export is never "
                       "called good before it has been run and compared")
    for p in (opts.calib_data, opts.val_data):
        if p is not None and not Path(p).is_file():
            raise GkdError(f"{p}: COCO JSON file not found")
    check_output_dir(opts.out)
    replaces_an_export = (opts.out / "export.json").is_file()
    torch.manual_seed(opts.seed)
    model, info = load_detector(opts.checkpoint)
    classes, category_ids = info.get("classes"), info.get("category_ids")

    t0 = time.perf_counter()
    parity_src = opts.val_data or opts.calib_data
    parity_set = load_image_set(parity_src, limit=opts.parity_images, seed=opts.seed + 1)
    calib_set = (load_image_set(opts.calib_data, limit=opts.calib_images, seed=opts.seed)
                 if "int8" in opts.precisions else None)
    if category_ids is None:
        category_ids = parity_set.category_ids
    if parity_set.has_annotations:
        check_label_space(parity_src, parity_set, classes, category_ids)
    annotated = parity_set.has_annotations
    log(f"parity on {len(parity_set.images)} image(s) of {parity_src}"
        + (f", calibration on {len(calib_set.images)} image(s) of {opts.calib_data}" if calib_set else ""))

    contract = preprocess_contract(model, classes=classes, category_ids=category_ids)
    from .trt import compute_profile

    # validated here, before anything is written, even where no engine will be built
    profile = compute_profile(contract, opts.min_shapes, opts.opt_shapes, opts.max_shapes)
    base_meta = {"gkd_export_version": 1, "contract": contract, "opset": opts.opset, "exporter": EXPORTER,
                 "source_checkpoint_sha256": file_sha256(opts.checkpoint)}
    paths = {p: opts.out / f"model.{p}.onnx" for p in PRECISIONS}
    sample = parity_set.images[0][1].unsqueeze(0)
    log(f"exporting FP32 ONNX (opset {opts.opset}) -> {paths['fp32']}")
    export_onnx(model, paths["fp32"], sample, opset=opts.opset, metadata={**base_meta, "precision": "fp32"})

    torch.set_num_threads(max(1, opts.threads))
    ref = collect_outputs(TorchRunner(model), parity_set.images)
    gt = (parity_set.gt_json, category_ids) if annotated else (None, None)
    ref_map = coco_map(ref, *gt) if annotated else None

    cut = contract["in_graph"]["postprocess"]["detections_per_img"]  # top-k cut: near-tie swaps there are no error

    def tol_for(p: str) -> Tolerances:
        return DEFAULT_TOLERANCES[p].replace(**opts.tolerance_overrides)

    def run_onnx(path: Path) -> list[dict]:
        with OrtRunner(path, threads=opts.threads) as r:
            return collect_outputs(r, parity_set.images), r.provider

    files: dict[str, Any] = {}
    rows = []
    for p in PRECISIONS:
        if p not in opts.precisions and not (p == "fp32"):
            continue
        extra: dict[str, Any] = {}
        if p == "fp16":
            from .fp16 import convert_fp16, count_tensor_types

            m16, extra = convert_fp16(load_onnx(paths["fp32"]))
            extra = {**extra, "initializer_types": count_tensor_types(m16)}
            save_onnx(m16, paths["fp16"], {**base_meta, "precision": "fp16", "fp16": extra})
        elif p == "int8":
            extra = _int8(opts, paths, calib_set, parity_set, base_meta, gt, ref_map, run_onnx, log)
        out, provider = run_onnx(paths[p])
        rep = compare_outputs(ref, out, tol_for(p), gt_json=gt[0], category_ids=gt[1], ref_map=ref_map,
                              max_detections=cut)
        rows.append({"precision": p, "provider": provider, "parity": rep})
        files[p] = {"onnx": paths[p].name, "sha256": file_sha256(paths[p]), "bytes": paths[p].stat().st_size,
                    "requested": p in opts.precisions, "verified": rep["passed"], "runs_on": provider,
                    "details": extra}
        log(f"{p}: parity {'PASS' if rep['passed'] else 'FAIL: ' + '; '.join(rep['failures'])}")

    engines = _engines(opts, paths, profile, log,
                       check=lambda runner, p: compare_outputs(ref, collect_outputs(runner, parity_set.images),
                                                               tol_for(p), gt_json=gt[0], category_ids=gt[1],
                                                               ref_map=ref_map, max_detections=cut))
    rtx = _rtx_check(opts, {p: paths[p] for p in files}, profile, log)
    table = format_table(rows)
    manifest = {
        "checkpoint": str(opts.checkpoint), "checkpoint_sha256": base_meta["source_checkpoint_sha256"],
        "arch": contract["arch"], "opset": opts.opset, "exporter": EXPORTER, "contract": contract, "files": files,
        "parity": {"reference": "pytorch fp32 (eager, CPU)", "images": len(parity_set.images),
                   "source": str(parity_src), "annotated": annotated, "reference_map": ref_map,
                   "results": {r["precision"]: r["parity"] for r in rows}},
        "tensorrt": engines, "tensorrt_profile": profile, "tensorrt_rtx_check": rtx, "versions": _versions(),
        "seconds": round(time.perf_counter() - t0, 1),
        "options": {k: (str(v) if isinstance(v, Path) else v) for k, v in dataclasses.asdict(opts).items()},
    }
    if replaces_an_export:
        _remove_replaced_files(opts.out, set(files))
    atomic_write_json(opts.out / "model.json", {"contract": contract, "files": {p: f["onnx"] for p, f in files.items()},
                                                "opset": opts.opset})
    atomic_write_json(opts.out / "parity.json", manifest["parity"])
    atomic_write_text(opts.out / "parity.md", table + "\n")
    atomic_write_json(opts.out / "export.json", manifest)
    log(table)
    return manifest


def check_label_space(src: Path, images, classes: list[str] | None, category_ids: list[int]) -> None:
    """Annotated parity images must be labelled in the model's label space: otherwise the mAP level would compare
    the model's labels with another dataset's categories (it used to be skipped without a word)."""
    same_ids = [int(c) for c in category_ids] == [int(c) for c in images.category_ids]
    same_names = classes is None or list(classes) == list(images.classes)
    if not (same_ids and same_names):
        raise GkdError(f"{src}: its categories {list(zip(images.category_ids, images.classes))} are not the "
                       f"checkpoint's {list(zip(category_ids, classes or ['?'] * len(category_ids)))}; give "
                       f"--val-data images labelled with the model's classes")


def _remove_replaced_files(out: Path, kept: set[str]) -> None:
    """Delete the files of precisions this export did not make, left by the export it replaces (``model.int8.onnx``
    of an earlier fp32+int8 export beside a new fp32-only one would be another model's file)."""
    for p in PRECISIONS:
        if p in kept:
            continue
        for stale in (out / f"model.{p}.onnx", out / f"model.{p}.engine", out / f"model.{p}.engine.json"):
            stale.unlink(missing_ok=True)


def _int8(opts, paths, calib_set, parity_set, base_meta, gt, ref_map, run_onnx, log) -> dict[str, Any]:
    """Quantize; with annotations, search for the layers to keep FP32 until ``int8_target`` of FP32 mAP holds."""
    from .quantize import quantize_int8, search_int8

    calib = [im for _, im in calib_set.images]
    meta = {**base_meta, "precision": "int8"}
    if ref_map is None or opts.int8_target <= 0:
        if ref_map is None:
            log("int8: no annotations on the parity images, so no accuracy-driven layer search (give --val-data)")
        return quantize_int8(paths["fp32"], paths["int8"], calib, method=opts.calib_method, metadata=meta)
    fp32_out, _ = run_onnx(paths["fp32"])
    reference = coco_map(fp32_out, *gt)["bbox_mAP"]

    def evaluate(path: Path) -> float:
        out, _ = run_onnx(path)
        return coco_map(out, *gt)["bbox_mAP"]

    info = search_int8(paths["fp32"], paths["int8"], calib, evaluate, reference, target_ratio=opts.int8_target,
                       method=opts.calib_method, threads=opts.threads, metadata=meta, log=log)
    info["search"]["evaluated_on"] = f"{len(parity_set.images)} parity image(s) of {parity_set.path}"
    return info


def _rtx_check(opts: ExportOptions, paths: dict[str, Path], profile: dict, log) -> dict[str, Any]:
    """Parse + build each file with TensorRT-RTX where it is installed (or asked for); one log line per file."""
    from . import trt_rtx

    if opts.tensorrt_rtx == "off":
        return {"ran": False, "reason": "--tensorrt-rtx-check off"}
    if not trt_rtx.available():
        if opts.tensorrt_rtx == "on":
            raise GkdError("--tensorrt-rtx-check on: tensorrt_rtx is not importable (pip install tensorrt-rtx, or "
                           "the trt-rtx extra)")
        return {"ran": False, "reason": "tensorrt-rtx is not installed"}
    results = trt_rtx.check_files(paths, profile)
    for p, r in results.items():
        log(f"tensorrt-rtx (builds on the CPU, never runs): {p}: {trt_rtx.summarize(r)}")
    return {"ran": True, "what": "TensorRT-RTX parse + build on the CPU; engines are never run",
            "results": results, "summary": {p: trt_rtx.summarize(r) for p, r in results.items()}}


def _engines(opts: ExportOptions, paths: dict[str, Path], profile: dict, log, check) -> dict[str, Any]:
    """Build, verify and run TensorRT engines when TensorRT and a GPU are present; otherwise say why in one line.

    ``check(runner, precision)`` runs parity of an engine against the PyTorch reference.
    """
    if opts.tensorrt == "off":
        return {"built": False, "reason": "--tensorrt off"}
    reason = None
    if not has_module("tensorrt"):
        reason = "tensorrt is not importable (install the 'trt' extra on a machine with an NVIDIA GPU)"
    elif not torch.cuda.is_available():
        reason = "no CUDA GPU visible to torch"
    if reason:
        if opts.tensorrt == "on":
            raise GkdError(f"--tensorrt on: cannot build engines: {reason}")
        log(f"tensorrt: skipped ({reason}); the ONNX files are written")
        return {"built": False, "reason": reason}
    import tensorrt as trt

    from .runtime import TrtRunner
    from .trt import build_engine, onnx_for_build, trt_major

    major = trt_major(trt)
    out = {"built": True, "tensorrt_version": trt.__version__, "typing": "strong" if major >= 11 else "weak",
           "profile": profile, "engines": {}}
    for p in opts.precisions:
        src = onnx_for_build(p, major, paths)
        engine = opts.out / f"model.{p}.engine"
        log(f"tensorrt {trt.__version__}: building {p} engine from {src.name}")
        stamp = build_engine(src, engine, precision=p, profile=profile, workspace_gib=opts.workspace_gib)
        with TrtRunner(engine) as runner:
            rep = check(runner, p)
        out["engines"][p] = {"engine": engine.name, **stamp, "parity": rep,
                             "good": bool(stamp["verified"] and rep["passed"])}
        log(f"tensorrt {p}: {stamp['verification']}; parity {'PASS' if rep['passed'] else 'FAIL'}")
    return out
