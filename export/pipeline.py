"""``gkd export`` as a library call: checkpoint -> ONNX (FP32/FP16/INT8) -> parity on real images -> engines.

Nothing is called good before it has been run: every ONNX written is executed with onnxruntime on real images and
compared with the PyTorch checkpoint (:mod:`gkd.export.parity`); the manifest marks a file ``verified`` only then.
The mAP level of that comparison, and the INT8 layer search, run on the whole annotated split given (up to
``accuracy_images``) and are judged against their own noise (a paired bootstrap). An INT8 file is described by what
it holds, read back from it (:mod:`gkd.export.int8_record`), and is called INT8 only when at least ``int8_floor`` of
its multiply-accumulates run in INT8.

Files are written into a hidden staging folder inside ``out`` and moved into place at the end, ``export.json``
last: a killed export leaves only that folder (removed by the next export), never a file without its record. An
``out`` that holds files of the names gkd writes but no ``export.json`` is refused: they are not gkd's to replace.
"""
from __future__ import annotations

import dataclasses
import os
import platform
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from gkd.core.errors import GkdError
from gkd.core.io import atomic_write_json, atomic_write_text

from ._lazy import has_module
from .adapters import preprocess_contract
from .onnx import DEFAULT_OPSET, EXPORTER, export_onnx, file_sha256, load_onnx, save_onnx
from .parity import (DEFAULT_TOLERANCES, Tolerances, collect_outputs, compare_outputs, format_table, map_comparison,
                     map_matches)

__all__ = ["ExportOptions", "export_checkpoint", "PRECISIONS", "EXPORT_RECORD_VERSION", "check_output_dir",
           "check_label_space", "unverified_files", "OUTPUT_NAMES_WRITTEN"]

PRECISIONS = ("fp32", "fp16", "int8")
#: the version of what an export records (export.json, the files' metadata): 2 = the INT8 record read back from the
#: file, the mAP level with its noise, the side-by-side latency. Part of gkd run's export key, so that a record made
#: by an earlier version is made again rather than reused without those fields
EXPORT_RECORD_VERSION = 2
#: the names gkd export writes into ``out`` (besides ``model.<precision>.onnx`` and TensorRT engines)
OUTPUT_NAMES_WRITTEN = ("model.json", "parity.json", "parity.md", "export.json")
_STAGING = ".gkd-export-"
_TEMP_PREFIXES = (_STAGING, ".gkd-calib-", ".gkd-int8-")


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
    #: the mAP level and the INT8 search use every annotated image of the parity source, up to this many
    accuracy_images: int = 500
    opset: int = DEFAULT_OPSET
    min_shapes: str | None = None
    opt_shapes: str | None = None
    max_shapes: str | None = None
    tolerance_overrides: dict[str, Any] = field(default_factory=dict)
    #: INT8 may lose at most (1 - int8_target) of FP32's mAP beyond chance; 0 = no layer search
    int8_target: float = 0.99
    #: the share of Conv/Gemm multiply-accumulates that must run in INT8 for the file to be called INT8
    int8_floor: float = 0.90
    #: the INT8 format: onnxruntime (uint8 asymmetric activations) or tensorrt (int8 symmetric, float bias)
    int8_format: str = "onnxruntime"
    #: timed rounds of the side-by-side INT8 / FP32 latency record (0: not timed)
    speed_rounds: int = 20
    #: also write the static (TensorRT-ready) graph at every precision: model.static-<precision>.onnx
    static: bool = True
    #: the largest batch of the static graph's TensorRT optimisation profile
    static_max_batch: int = 4
    tensorrt: str = "auto"  # auto | off | on
    workspace_gib: float = 4.0
    tensorrt_rtx: str = "auto"  # auto | off | on: the TensorRT-RTX parse/build check (export/trt_rtx.py)
    threads: int = 1
    seed: int = 0


def check_output_dir(out: Path) -> None:
    """Fail early (before any work) when ``out`` cannot hold files or holds files gkd did not make; creates it if
    needed and removes what a killed export left (hidden staging and calibration folders)."""
    from gkd.core.io import ensure_writable_folder

    ensure_writable_folder(out, "output folder")
    if not (out / "export.json").is_file():
        theirs = sorted(p.name for p in out.iterdir() if p.name in OUTPUT_NAMES_WRITTEN
                        or (p.name.startswith("model.") and p.suffix in (".onnx", ".engine")))
        if theirs:
            raise GkdError(f"{out}: holds {', '.join(theirs)} but no export.json, so gkd did not make them and will "
                           f"not replace them; give another --out or move them away")
    for p in out.iterdir():
        if p.is_dir() and p.name.startswith(_TEMP_PREFIXES):
            shutil.rmtree(p, ignore_errors=True)


def _versions() -> dict[str, str]:
    import onnx
    import onnxruntime
    import torchvision

    return {"torch": torch.__version__, "torchvision": torchvision.__version__, "onnx": onnx.__version__,
            "onnxruntime": onnxruntime.__version__, "python": platform.python_version()}


def _check_options(opts: ExportOptions) -> None:
    from .quantize import INT8_FORMATS

    bad = [p for p in opts.precisions if p not in PRECISIONS]
    if bad or not opts.precisions:
        raise GkdError(f"--precision: unknown precision '{bad[0] if bad else ''}'; expected a comma-separated list "
                       f"of {', '.join(PRECISIONS)}")
    if opts.int8_format not in INT8_FORMATS:
        raise GkdError(f"--int8-format: '{opts.int8_format}' is unknown; expected one of {', '.join(INT8_FORMATS)}")
    if not 0 <= opts.int8_floor <= 1:
        raise GkdError(f"--int8-floor: {opts.int8_floor} is not a share between 0 and 1")
    if "int8" in opts.precisions and opts.calib_data is None:
        raise GkdError("--precision int8 needs --calib-data DATA.json (real images to calibrate on)")
    if opts.calib_data is None and opts.val_data is None:
        raise GkdError("parity needs real images: give --val-data DATA.json (or --calib-data); an export is never "
                       "called good before it has been run and compared")
    for p in (opts.calib_data, opts.val_data):
        if p is not None and not Path(p).is_file():
            raise GkdError(f"{p}: COCO JSON file not found")
    _rtx_wanted(opts)  # --tensorrt-rtx-check on without tensorrt-rtx: refused before any work


def export_checkpoint(opts: ExportOptions, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Run the whole export. Returns the manifest (also written to ``out/export.json``).

    Raises:
        GkdError: bad input (checked before anything is written) or a failed step.
    """
    from gkd.kd.checkpoint import load_detector

    from .images import load_image_set

    _check_options(opts)
    check_output_dir(opts.out)
    replaces = (opts.out / "export.json").is_file()
    torch.manual_seed(opts.seed)
    model, info = load_detector(opts.checkpoint)
    classes, category_ids = info.get("classes"), info.get("category_ids")

    t0 = time.perf_counter()
    parity_src = opts.val_data or opts.calib_data
    parity_set = load_image_set(parity_src, limit=opts.parity_images, seed=opts.seed + 1)
    accuracy_set = load_image_set(parity_src, limit=opts.accuracy_images, seed=opts.seed + 1, lazy=True)
    calib_set = (load_image_set(opts.calib_data, limit=opts.calib_images, seed=opts.seed)
                 if "int8" in opts.precisions else None)
    if category_ids is None:
        category_ids = parity_set.category_ids
    annotated = accuracy_set.has_annotations
    if annotated:
        check_label_space(parity_src, parity_set, classes, category_ids)
    log(f"parity on {len(parity_set.images)} image(s) of {parity_src}"
        + (f", mAP on {len(accuracy_set.images)} annotated image(s)" if annotated else ", no annotations: no mAP")
        + (f", calibration on {len(calib_set.images)} image(s) of {opts.calib_data}" if calib_set else ""))

    contract = preprocess_contract(model, classes=classes, category_ids=category_ids)
    from .trt import compute_profile

    # validated here, before anything is written, even where no engine will be built
    profile = compute_profile(contract, opts.min_shapes, opts.opt_shapes, opts.max_shapes)
    base_meta = {"gkd_export_version": EXPORT_RECORD_VERSION, "contract": contract, "opset": opts.opset,
                 "exporter": EXPORTER, "source_checkpoint_sha256": file_sha256(opts.checkpoint)}
    staging = opts.out / f"{_STAGING}{os.getpid()}"
    staging.mkdir()
    try:
        manifest = _export(opts, model, staging, parity_set, accuracy_set if annotated else None, calib_set,
                           contract, profile, base_meta, category_ids, log)
        manifest["seconds"] = round(time.perf_counter() - t0, 1)
        _move_into_place(opts.out, staging, manifest, replaces, log)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return manifest


def _export(opts, model, staging: Path, parity_set, accuracy_set, calib_set, contract, profile, base_meta,
            category_ids, log) -> dict[str, Any]:
    """Write, run and compare every file inside ``staging``; returns the manifest (file names relative)."""
    from .runtime import OrtRunner, TorchRunner

    graphs = ["torchvision"] + (["static"] if opts.static else [])
    paths = {_key(g, p): staging / f"model.{_key(g, p)}.onnx" for g in graphs for p in PRECISIONS}
    sample = parity_set.images[0][1].unsqueeze(0)

    from gkd.kd.fake_quant import fake_quant_disabled, fake_quant_state

    torch.set_num_threads(max(1, opts.threads))
    qat = fake_quant_state(model)  # a quantization-aware student: INT8 files are compared with it as it trained
    torch_runner = TorchRunner(model)

    def reference(images, quantized: bool):
        if quantized:
            return collect_outputs(torch_runner, images)
        with fake_quant_disabled(model):
            return collect_outputs(torch_runner, images)

    refs = {False: reference(parity_set.images, False)}
    matches: dict[bool, Any] = {False: None}
    if accuracy_set is not None:
        matches[False] = map_matches(reference(accuracy_set.images, False), accuracy_set.gt_json, category_ids)
    if qat is not None and "int8" in opts.precisions:
        refs[True] = reference(parity_set.images, True)
        if accuracy_set is not None:
            matches[True] = map_matches(reference(accuracy_set.images, True), accuracy_set.gt_json, category_ids)

    def against(p: str) -> bool:
        """Whether precision ``p`` is compared with the fake-quantized student (else the float network)."""
        return p == "int8" and True in refs

    ref_matches = matches[False]
    cut = contract["in_graph"]["postprocess"]["detections_per_img"]  # top-k cut: near-tie swaps there are no error

    def tol_for(p: str) -> Tolerances:
        base = DEFAULT_TOLERANCES[p]
        if p == "int8" and opts.int8_target > 0:
            base = base.replace(min_map_ratio=opts.int8_target)
        return base.replace(**opts.tolerance_overrides)

    def accuracy(path: Path, p: str) -> dict[str, Any] | None:
        """The mAP level of ``path`` against PyTorch on the accuracy set (None without annotations)."""
        if ref_matches is None:
            return None
        with OrtRunner(path, threads=opts.threads) as r:
            out = collect_outputs(r, accuracy_set.images)
        return map_comparison(matches[against(p)], map_matches(out, accuracy_set.gt_json, category_ids),
                              tol_for(p).min_map_ratio, seed=opts.seed)

    from . import trt_rtx

    # TensorRT builds the static graph where it is written (torchvision's needs NonZero, NMS and the RoiAlign plugin)
    build_graph = "static" if opts.static else "torchvision"
    build_profile = _static_profile(profile, opts.static_max_batch) if opts.static else profile
    rtx_on = _rtx_wanted(opts)
    checks: dict[str, Any] = {}
    files: dict[str, Any] = {}
    rows = []
    for graph in graphs:
        static = graph == "static"
        meta = {**base_meta, "graph": graph}
        if static:
            from .static_graph import StaticDetector

            with fake_quant_disabled(model):
                meta["static"] = StaticDetector(model).describe()
        for p in PRECISIONS:
            if p not in opts.precisions and not (p == "fp32"):
                continue
            key = _key(graph, p)
            extra: dict[str, Any] = {}
            level = None
            if p == "fp32":
                log(f"exporting FP32 ONNX ({graph} graph, opset {opts.opset}) -> {opts.out / paths[key].name}")
                with fake_quant_disabled(model):  # the float network: INT8 is made from it
                    export_onnx(model, paths[key], sample, opset=opts.opset,
                                metadata={**meta, "precision": "fp32"}, static=static)
            elif p == "fp16":
                from .fp16 import convert_fp16, count_tensor_types

                m16, extra = convert_fp16(load_onnx(paths[_key(graph, "fp32")]), scopes=_scopes(static))
                extra = {**extra, "initializer_types": count_tensor_types(m16)}
                save_onnx(m16, paths[key], {**meta, "precision": "fp16"})
            else:
                fmt = "tensorrt" if static else (qat.fmt.name if qat is not None else opts.int8_format)
                if qat is not None and not static and fmt != opts.int8_format:
                    log(f"int8: the student trained with fake INT8 in the {fmt} format; its file is written in it "
                        f"(not --int8-format {opts.int8_format})")
                learned = model if qat is not None and qat.fmt.name == fmt else None
                extra, level = _int8(opts, paths[_key(graph, "fp32")], paths[key], calib_set, parity_set, meta,
                                     accuracy, ref_matches is not None, log, fmt, static, learned)
            if level is None:
                level = accuracy(paths[key], p)
            with OrtRunner(paths[key], threads=opts.threads) as r:
                out, provider = collect_outputs(r, parity_set.images), r.provider
            rep = compare_outputs(refs[against(p)], out, tol_for(p), max_detections=cut, map_level=level)
            if p == "int8" and not extra["is_int8"]:
                rep["passed"] = False
                rep["failures"].append(_not_int8(extra))
            rows.append({"precision": key, "provider": provider, "parity": rep})
            files[key] = {"onnx": paths[key].name, "sha256": file_sha256(paths[key]),
                          "bytes": paths[key].stat().st_size, "precision": p, "graph": graph,
                          "requested": p in opts.precisions, "verified": rep["passed"], "runs_on": provider,
                          "details": extra}
            log(f"{key}: parity {'PASS' if rep['passed'] else 'FAIL: ' + '; '.join(rep['failures'])}")
            if graph == build_graph and rtx_on:  # its TensorRT-RTX build runs on the other core meanwhile
                checks[key] = trt_rtx.BackgroundCheck(paths[key], build_profile)

    rtx = _rtx_record(opts, {k: c.result() for k, c in checks.items()}, log)  # before timing: a quiet machine
    rtx["graph"] = build_graph
    speed = None
    if "int8" in files and opts.speed_rounds > 0:
        from .speed import side_by_side

        timed = [k for k in ("fp32", "int8", "static-fp32", "static-int8") if k in files]
        speed = side_by_side({k: paths[k] for k in timed}, [im for _, im in parity_set.images],
                             threads=opts.threads, rounds=opts.speed_rounds)
        log(f"speed (onnxruntime CPU, {opts.threads} thread(s), {speed['machine']['cpu']}): INT8 p50 "
            f"{speed['p50_ms']['int8']:.1f} ms / FP32 {speed['p50_ms']['fp32']:.1f} ms = "
            f"{speed['ratio']['int8/fp32']:.2f}" + "".join(f"; {k} {v:.2f}" for k, v in speed["ratio"].items()
                                                           if k != "int8/fp32"))
    build_paths = {p: paths[_key(build_graph, p)] for p in PRECISIONS if _key(build_graph, p) in files}
    engines = _engines(opts, staging, build_paths, build_profile, log,
                       check=lambda runner, p: compare_outputs(refs[against(p)],
                                                               collect_outputs(runner, parity_set.images),
                                                               tol_for(p), max_detections=cut))
    return {
        "checkpoint": str(opts.checkpoint), "checkpoint_sha256": base_meta["source_checkpoint_sha256"],
        "arch": contract["arch"], "opset": opts.opset, "exporter": EXPORTER, "contract": contract, "files": files,
        "parity": {"reference": "pytorch fp32 (eager, CPU)" + (
                       "; INT8 files: the fake-quantized student as it trained (eager, CPU)" if True in refs else ""),
                   "images": len(parity_set.images),
                   "source": str(parity_set.path), "annotated": accuracy_set is not None,
                   "map_images": len(accuracy_set.images) if accuracy_set is not None else 0,
                   "results": {r["precision"]: r["parity"] for r in rows}},
        "table": format_table(rows), "speed": speed,
        "tensorrt": engines, "tensorrt_profile": build_profile, "tensorrt_rtx_check": rtx,
        "trtexec": _trtexec_commands(build_paths, build_profile) if opts.static else None, "versions": _versions(),
        "options": {k: (str(v) if isinstance(v, Path) else v) for k, v in dataclasses.asdict(opts).items()},
    }


def unverified_files(manifest: dict[str, Any]) -> list[str]:
    """The requested files of an export that failed parity: every graph's (``int8``, ``static-int8``), and the
    TensorRT engines that failed theirs (``fp16 engine``)."""
    failed = [k for k, f in manifest["files"].items() if f["requested"] and not f["verified"]]
    return failed + [f"{p} engine" for p, e in (manifest.get("tensorrt") or {}).get("engines", {}).items()
                     if not e["good"]]


def _static_profile(profile: dict, max_batch: int) -> dict:
    """The image profile with a dynamic batch (1 .. ``max_batch``) for the static graph."""
    shapes = profile["image"]
    return {"image": {"min": [1, *shapes["min"][1:]], "opt": [1, *shapes["opt"][1:]],
                      "max": [max_batch, *shapes["max"][1:]]}}


def _trtexec_commands(paths: dict[str, Path], profile: dict) -> dict[str, str]:
    """The trtexec command a TensorRT 10/11 user runs to build and time each static file's engine.

    TensorRT 11 is strongly typed (precision from the file: FP16 and Q/DQ INT8 files); TensorRT 10.x also takes
    ``--fp16`` / ``--int8`` flags, which are harmless on the FP16 / Q/DQ files, so one command serves both.
    """
    shape = {k: "image:" + "x".join(str(d) for d in v) for k, v in profile["image"].items()}
    flags = {"fp32": "", "fp16": " --fp16", "int8": " --int8 --fp16"}
    return {p: (f"trtexec --onnx={path.name} --saveEngine={path.stem}.engine --minShapes={shape['min']} "
                f"--optShapes={shape['opt']} --maxShapes={shape['max']}{flags[p]} --useCudaGraph --noDataTransfers "
                f"--iterations=200 --warmUp=500 --duration=10")
            for p, path in paths.items()}


def _key(graph: str, precision: str) -> str:
    """A file's key in the manifest and its name: ``fp32`` (torchvision's graph), ``static-fp32`` (the
    TensorRT-ready one)."""
    return precision if graph == "torchvision" else f"{graph}-{precision}"


def _scopes(static: bool) -> tuple[str, ...]:
    from .adapters import NETWORK_SCOPES
    from .static_graph import STATIC_SCOPES

    return STATIC_SCOPES if static else NETWORK_SCOPES


def _not_int8(record: dict[str, Any]) -> str:
    share = record["macs_int8_share"] if record["macs_int8_share"] is not None else record["weights_int8_share"]
    blocking = record["blocking"][:5]
    return (f"int8: only {share:.1%} of the Conv/Gemm {record['share_measure']} run in INT8 (floor "
            f"{record['floor']:.0%}), so this file is not INT8; float layers holding the most: "
            f"{', '.join(blocking)}{' ...' if len(record['blocking']) > 5 else ''}")


def _move_into_place(out: Path, staging: Path, manifest: dict[str, Any], replaces: bool, log) -> None:
    """Move the staged files into ``out`` (the records last) and remove what the replaced export made that this one
    did not (another model's files must not stay beside this one's record)."""
    made = {p.name for p in staging.iterdir() if p.is_file() and p.name.endswith((".onnx", ".engine", ".json"))
            and not p.name.endswith("-inferred.onnx")}
    if replaces:
        stale = sorted(p.name for p in out.iterdir() if p.is_file() and p.name.startswith("model.")
                       and p.suffix in (".onnx", ".engine", ".json") and p.name not in made
                       and p.name != "model.json")
        for name in stale:
            (out / name).unlink(missing_ok=True)
        if stale:
            log(f"removed {', '.join(stale)}: files of the export this one replaces, for precisions not made now")
    for name in sorted(made):
        os.replace(staging / name, out / name)
    files = manifest["files"]
    atomic_write_json(out / "model.json", {"contract": manifest["contract"],
                                           "files": {p: f["onnx"] for p, f in files.items()},
                                           "opset": manifest["opset"]})
    atomic_write_json(out / "parity.json", manifest["parity"])
    atomic_write_text(out / "parity.md", manifest["table"] + "\n")
    atomic_write_json(out / "export.json", manifest)
    log(manifest["table"])


def check_label_space(src: Path, images, classes: list[str] | None, category_ids: list[int]) -> None:
    """Annotated parity images must be labelled in the model's label space: otherwise the mAP level would compare
    the model's labels with another dataset's categories (it used to be skipped without a word)."""
    same_ids = [int(c) for c in category_ids] == [int(c) for c in images.category_ids]
    same_names = classes is None or list(classes) == list(images.classes)
    if not (same_ids and same_names):
        raise GkdError(f"{src}: its categories {list(zip(images.category_ids, images.classes))} are not the "
                       f"checkpoint's {list(zip(category_ids, classes or ['?'] * len(category_ids)))}; give "
                       f"--val-data images labelled with the model's classes")


def _int8(opts, fp32: Path, out: Path, calib_set, parity_set, meta, accuracy, annotated: bool, log,
          int8_format: str, static: bool, learned=None) -> tuple[dict[str, Any], dict | None]:
    """Quantize ``fp32`` into ``out``; with annotations, keep layers in float only while INT8 loses accuracy beyond
    chance. Returns the INT8 record (read back from the file) and the file's mAP level (the search's last verdict)
    if one was made.

    With ``learned`` (a quantization-aware student) the file takes the scales it learned and every layer it trained
    in INT8 is INT8: no calibration and no search (keeping a trained layer float would undo its training)."""
    from .quantize import quantize_int8, search_int8

    calib = [im for _, im in calib_set.images]
    kw = dict(method=opts.calib_method, metadata={**meta, "precision": "int8"}, int8_format=int8_format,
              floor=opts.int8_floor, count_image=parity_set.images[0][1], scopes=_scopes(static))
    if static:
        from .static_graph import static_head_outputs

        kw["head_outputs"] = static_head_outputs(load_onnx(fp32))
    if learned is not None:
        log(f"int8: the learned scales of the quantization-aware student ({int8_format} format), no calibration")
        return quantize_int8(fp32, out, calib, learned_from=learned, **kw), None
    if not annotated or opts.int8_target <= 0:
        if not annotated:
            log("int8: no annotations on the parity source, so no accuracy-driven layer search (give --val-data)")
        return quantize_int8(fp32, out, calib, **kw), None
    info = search_int8(fp32, out, calib, lambda path: accuracy(path, "int8"), threads=opts.threads, log=log, **kw)
    level = info["search"]["rounds"][-1]["verdict"]
    info["search"]["judged_on"] = f"{level['images']} annotated image(s) of {parity_set.path}"
    return info, level


def _rtx_wanted(opts: ExportOptions) -> bool:
    """Whether to run the TensorRT-RTX parse/build check (``--tensorrt-rtx-check``; auto: where it is installed)."""
    from . import trt_rtx

    if opts.tensorrt_rtx == "off":
        return False
    if not trt_rtx.available():
        if opts.tensorrt_rtx == "on":
            raise GkdError("--tensorrt-rtx-check on: tensorrt_rtx is not importable (pip install tensorrt-rtx, or "
                           "the trt-rtx extra)")
        return False
    return True


def _rtx_record(opts: ExportOptions, results: dict[str, Any], log) -> dict[str, Any]:
    """The check's record (one log line per file), or why it did not run."""
    from . import trt_rtx

    if opts.tensorrt_rtx == "off":
        return {"ran": False, "reason": "--tensorrt-rtx-check off"}
    if not results:
        return {"ran": False, "reason": "tensorrt-rtx is not installed"}
    for p, r in results.items():
        log(f"tensorrt-rtx (builds on the CPU, never runs): {p}: {trt_rtx.summarize(r)}")
    return {"ran": True, "what": "TensorRT-RTX parse + build on the CPU; engines are never run",
            "results": results, "summary": {p: trt_rtx.summarize(r) for p, r in results.items()}}


def _engines(opts: ExportOptions, staging: Path, paths: dict[str, Path], profile: dict, log, check
             ) -> dict[str, Any]:
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
        engine = staging / f"model.{p}.engine"
        log(f"tensorrt {trt.__version__}: building {p} engine from {src.name}")
        stamp = build_engine(src, engine, precision=p, profile=profile, workspace_gib=opts.workspace_gib)
        with TrtRunner(engine) as runner:
            rep = check(runner, p)
        out["engines"][p] = {"engine": engine.name, **stamp, "parity": rep,
                             "good": bool(stamp["verified"] and rep["passed"])}
        log(f"tensorrt {p}: {stamp['verification']}; parity {'PASS' if rep['passed'] else 'FAIL'}")
    return out
