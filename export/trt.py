"""TensorRT engines from the exported ONNX files: optimisation profile, build for TensorRT 10.x (weak typing) and
11.x (strong typing), verification of the precision actually built, and a stamp that ties an engine to a machine.

* **TensorRT 11** removed weak typing: no FP16/INT8 builder flags, no calibrators. Precision comes from the ONNX:
  the FP16 ONNX for FP16, the Q/DQ ONNX for INT8 (see :mod:`gkd.export.fp16`, :mod:`gkd.export.quantize`).
* **TensorRT 10.x** (what JetPack ships) is weakly typed: the FP32 ONNX plus ``BuilderFlag.FP16`` for FP16, the Q/DQ
  ONNX plus ``INT8`` (and ``FP16`` for the layers left unquantized) for INT8.
* Requested precision is never trusted: after the build the engine inspector lists every layer's tensor formats;
  :func:`summarize_layer_precisions` counts them and :func:`verify_precision` refuses an FP16 request that built no
  FP16 layer (the silent FP32 engine that TensorRT 11 gives to code still using the old flags).
* An engine only runs on the TensorRT version and GPU model it was built with: ``<engine>.json`` records TensorRT's
  version, the GPU name and compute capability, the precision as built and the SHA-256 of the source ONNX and of the
  engine; :func:`check_stamp` refuses a mismatch with a one-line error.

Everything except :func:`build_engine` is plain Python and is tested without TensorRT.
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Mapping

from gkd.core.errors import GkdError
from gkd.core.io import atomic_write_bytes, atomic_write_json, read_json

from ._lazy import lazy_import
from .adapters import INPUT_NAME
from .onnx import file_sha256

__all__ = ["parse_shapes", "compute_profile", "trt_major", "current_machine", "make_stamp", "write_stamp",
           "load_stamp", "check_stamp", "summarize_layer_precisions", "verify_precision", "build_engine",
           "onnx_for_build", "stamp_path", "STAMP_VERSION"]

STAMP_VERSION = 1
MIN_SIDE = 16  # smaller inputs are not images; the graph resizes anyway


def parse_shapes(spec: str | None, option: str = "--opt-shapes") -> dict[str, tuple[int, ...]]:
    """Parse trtexec's shape syntax, ``name:1x3x320x320[,name2:...]``.

    Args:
        spec: the option value (None or "" -> empty dict).
        option: the option name, for error messages.
    """
    if not spec:
        return {}
    shapes = {}
    for part in spec.split(","):
        name, sep, dims = part.strip().rpartition(":")
        if not sep or not name or not re.fullmatch(r"\d+(x\d+)*", dims):
            raise GkdError(f"{option}: '{part}' is not trtexec shape syntax; expected e.g. '{INPUT_NAME}:1x3x320x320'")
        shapes[name] = tuple(int(d) for d in dims.split("x"))
    return shapes


def compute_profile(contract: Mapping[str, Any], min_shapes: str | None = None, opt_shapes: str | None = None,
                    max_shapes: str | None = None) -> dict[str, dict[str, list[int]]]:
    """The optimisation profile of the image input: trtexec-style overrides on top of defaults from the contract.

    Defaults: min ``1x3x32x32``; opt ``1x3x{min_size}x{max_size}`` (the size the graph resizes to, so the
    backbone runs at its tuned shape for inputs already at that size); max ``1x3x{4*max_size}x{4*max_size}`` (larger
    camera frames are only resized down inside the graph, so a generous max costs little).

    Returns:
        ``{"image": {"min": [1, 3, h, w], "opt": [...], "max": [...]}}``.
    """
    resize = contract["in_graph"]["resize"]
    lo, hi = int(resize["min_size"]), int(resize["max_size"])
    prof = {"min": [1, 3, 32, 32], "opt": [1, 3, lo, hi], "max": [1, 3, 4 * hi, 4 * hi]}
    for key, spec, option in (("min", min_shapes, "--min-shapes"), ("opt", opt_shapes, "--opt-shapes"),
                              ("max", max_shapes, "--max-shapes")):
        given = parse_shapes(spec, option)
        unknown = [n for n in given if n != INPUT_NAME]
        if unknown:
            raise GkdError(f"{option}: unknown input '{unknown[0]}'; the model has one input, '{INPUT_NAME}'")
        if INPUT_NAME in given:
            dims = list(given[INPUT_NAME])
            if len(dims) != 4 or dims[0] != 1 or dims[1] != 3:
                raise GkdError(f"{option}: {INPUT_NAME} must be 1x3xHxW (batch fixed at 1, RGB), got "
                               f"{'x'.join(map(str, dims))}")
            if min(dims[2:]) < MIN_SIDE:
                raise GkdError(f"{option}: height and width must be at least {MIN_SIDE}, got {dims[2]}x{dims[3]}")
            prof[key] = dims
    for i, side in ((2, "height"), (3, "width")):
        if not prof["min"][i] <= prof["opt"][i] <= prof["max"][i]:
            raise GkdError(f"optimisation profile: {side} must satisfy min <= opt <= max, got "
                           f"{prof['min'][i]} / {prof['opt'][i]} / {prof['max'][i]}")
    return {INPUT_NAME: prof}


def trt_major(trt) -> int:
    """Major version of an imported ``tensorrt`` module."""
    try:
        return int(str(trt.__version__).split(".")[0])
    except (AttributeError, ValueError):
        raise GkdError(f"cannot read the TensorRT version from {getattr(trt, '__version__', None)!r}") from None


def current_machine(trt, device: int = 0) -> dict[str, str]:
    """TensorRT version, GPU name and compute capability of this machine (what an engine is tied to)."""
    import torch

    if not torch.cuda.is_available():
        raise GkdError("TensorRT engines need a CUDA GPU; torch.cuda.is_available() is False on this machine")
    major, minor = torch.cuda.get_device_capability(device)
    return {"tensorrt_version": str(trt.__version__), "gpu_name": torch.cuda.get_device_name(device),
            "compute_capability": f"{major}.{minor}"}


def stamp_path(engine_path: str | Path) -> Path:
    """The stamp of ``model.int8.engine`` is ``model.int8.engine.json``."""
    engine_path = Path(engine_path)
    return engine_path.with_name(engine_path.name + ".json")


def make_stamp(machine: Mapping[str, str], *, precision_requested: str, layer_precisions: Mapping[str, int],
               typing: str, onnx_sha256: str, engine_sha256: str, profile: Mapping[str, Any]) -> dict[str, Any]:
    """The sidecar of an engine (see the module docstring)."""
    return {"stamp_version": STAMP_VERSION, **dict(machine), "typing": typing,
            "precision_requested": precision_requested, "precision_built": dominant_precision(layer_precisions),
            "layer_precisions": dict(layer_precisions), "source_onnx_sha256": onnx_sha256,
            "engine_sha256": engine_sha256, "profile": dict(profile)}


def write_stamp(engine_path: str | Path, stamp: Mapping[str, Any]) -> Path:
    return atomic_write_json(stamp_path(engine_path), dict(stamp))


def load_stamp(engine_path: str | Path) -> dict[str, Any]:
    """Read an engine's stamp; a missing or malformed stamp is an error (an unstamped engine is never run)."""
    path = stamp_path(engine_path)
    if not path.is_file():
        raise GkdError(f"{engine_path}: no stamp {path.name} next to the engine; rebuild it with gkd export")
    stamp = read_json(path, "engine stamp")
    need = ("stamp_version", "tensorrt_version", "gpu_name", "compute_capability", "precision_built",
            "source_onnx_sha256", "engine_sha256")
    missing = [k for k in need if not isinstance(stamp, dict) or k not in stamp]
    if missing:
        raise GkdError(f"{path}: engine stamp lacks '{missing[0]}'; rebuild the engine with gkd export")
    return stamp


def check_stamp(stamp: Mapping[str, Any], machine: Mapping[str, str], engine_path: str | Path | None = None,
                onnx_path: str | Path | None = None) -> None:
    """Refuse (GkdError) an engine built for another TensorRT version or GPU, or whose file changed.

    Args:
        stamp: from :func:`load_stamp`.
        machine: from :func:`current_machine`.
        engine_path: when given, the file's SHA-256 must equal the stamp's.
        onnx_path: when given, the ONNX's SHA-256 must equal the stamp's source hash (stale engine check).
    """
    where = str(engine_path) if engine_path is not None else "engine"
    for key, what in (("tensorrt_version", "TensorRT version"), ("gpu_name", "GPU"),
                      ("compute_capability", "compute capability")):
        if str(stamp.get(key)) != str(machine.get(key)):
            raise GkdError(f"{where}: built for {what} {stamp.get(key)}, this machine has {machine.get(key)}; "
                           f"engines are not portable: rebuild it here with gkd export")
    if engine_path is not None and file_sha256(engine_path) != stamp["engine_sha256"]:
        raise GkdError(f"{where}: the engine file does not match its stamp (modified or replaced); rebuild it")
    if onnx_path is not None and file_sha256(onnx_path) != stamp["source_onnx_sha256"]:
        raise GkdError(f"{where}: built from another version of {onnx_path}; rebuild it")


_DTYPE_PATTERNS = (("INT8", r"\bint8\b"), ("FP8", r"\bfp8\b"), ("FP16", r"\b(fp16|half)\b"), ("BF16", r"\bbf16\b"),
                   ("FP32", r"\b(fp32|float)\b"))
_RANK = {"FP8": 0, "INT8": 1, "FP16": 2, "BF16": 2, "FP32": 3}


def _tensor_dtype(desc: Any) -> str | None:
    text = json.dumps(desc).lower() if not isinstance(desc, str) else desc.lower()
    for name, pat in _DTYPE_PATTERNS:
        if re.search(pat, text):
            return name
    return None


def summarize_layer_precisions(info: str | Mapping[str, Any]) -> dict[str, int]:
    """Count engine layers by compute precision, from the engine inspector's JSON.

    Args:
        info: ``inspector.get_engine_information(LayerInformationFormat.JSON)`` (a string or parsed), built with
            ``ProfilingVerbosity.DETAILED``. Each layer lists ``Inputs``/``Outputs`` with a ``Format/Datatype``
            such as ``"Row major linear FP16 format"`` or ``"Channel major INT8 format"``.

    Returns:
        ``{"FP32": n, "FP16": n, "INT8": n, ...}``: a layer counts at the narrowest floating/INT8 type among its
        tensors; layers with only integer/bool tensors (shape arithmetic) count as ``"other"``.
    """
    data = json.loads(info) if isinstance(info, str) else dict(info)
    layers = data.get("Layers")
    if not isinstance(layers, list):
        raise GkdError("engine inspector output has no 'Layers' list; build with ProfilingVerbosity.DETAILED")
    counts: dict[str, int] = {}
    for layer in layers:
        if isinstance(layer, str):  # ProfilingVerbosity below DETAILED gives names only
            raise GkdError("engine inspector lists layer names only; build with ProfilingVerbosity.DETAILED")
        types = [_tensor_dtype(t.get("Format/Datatype", t)) if isinstance(t, dict) else _tensor_dtype(t)
                 for t in list(layer.get("Inputs", [])) + list(layer.get("Outputs", []))]
        types = [t for t in types if t is not None]
        key = min(types, key=_RANK.__getitem__) if types else "other"
        counts[key] = counts.get(key, 0) + 1
    return counts


def dominant_precision(counts: Mapping[str, int]) -> str:
    """The narrowest precision present in an engine (what it was really built at): int8 > fp16 > fp32."""
    for name in ("FP8", "INT8", "FP16", "BF16", "FP32"):
        if counts.get(name):
            return name.lower()
    return "unknown"


def verify_precision(requested: str, counts: Mapping[str, int]) -> tuple[bool, str]:
    """Does the built engine have the requested precision? Returns ``(ok, one-line explanation)``."""
    total = sum(counts.values()) or 1
    summary = ", ".join(f"{k} {v}" for k, v in sorted(counts.items()))
    want = requested.upper()
    if requested == "fp32":
        low = sum(counts.get(k, 0) for k in ("FP16", "BF16", "INT8", "FP8"))
        return (low == 0, f"fp32 requested; layers: {summary}" + ("" if low == 0 else
                                                                  f" ({low} reduced-precision layer(s))"))
    n = counts.get(want, 0)
    if n == 0:
        return False, f"{requested} requested but the engine has no {want} layer (layers: {summary}): it was " \
                      f"built at {dominant_precision(counts)}"
    return True, f"{requested} requested; {n}/{total} layers {want} (layers: {summary})"


def onnx_for_build(precision: str, major: int, paths: Mapping[str, Path]) -> Path:
    """Which ONNX to build from: TensorRT 11 reads the precision from the graph; 10.x uses FP32 + a flag for FP16."""
    if precision == "fp16" and major < 11:
        return paths["fp32"]
    return paths[precision]


def build_engine(onnx_path: str | Path, engine_path: str | Path, *, precision: str,
                 profile: Mapping[str, Mapping[str, list[int]]], workspace_gib: float = 4.0, device: int = 0
                 ) -> dict[str, Any]:
    """Build, inspect, verify and stamp a TensorRT engine (needs TensorRT and a CUDA GPU).

    Args:
        onnx_path: from :func:`onnx_for_build`.
        engine_path: the ``.engine`` file to write (atomically), with its ``.json`` stamp.
        precision: fp32 | fp16 | int8 (the request; the stamp records what was built).
        profile: from :func:`compute_profile`.
        workspace_gib: builder workspace limit.

    Returns:
        The stamp, plus ``verified`` and ``verification`` (the :func:`verify_precision` result).
    """
    trt = lazy_import("tensorrt", "TensorRT engine builds")
    machine = current_machine(trt, device)
    major = trt_major(trt)
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    flags = 0
    strong = major >= 11
    if strong and hasattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED"):
        flags |= 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse(Path(onnx_path).read_bytes()):
        errs = [str(parser.get_error(i)) for i in range(parser.num_errors)]
        raise GkdError(f"{onnx_path}: TensorRT's ONNX parser failed: {errs[0] if errs else 'unknown error'}"
                       + (f" (+{len(errs) - 1} more)" if len(errs) > 1 else ""))
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gib * (1 << 30)))
    config.profiling_verbosity = trt.ProfilingVerbosity.DETAILED  # the inspector needs per-layer formats
    if not strong:  # TensorRT 10.x weak typing: precision from builder flags
        if precision in ("fp16", "int8"):
            config.set_flag(trt.BuilderFlag.FP16)
        if precision == "int8":
            config.set_flag(trt.BuilderFlag.INT8)  # with explicit Q/DQ in the graph: no calibrator
    prof = builder.create_optimization_profile()
    for name, shapes in profile.items():
        prof.set_shape(name, tuple(shapes["min"]), tuple(shapes["opt"]), tuple(shapes["max"]))
    config.add_optimization_profile(prof)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise GkdError(f"{onnx_path}: TensorRT failed to build a {precision} engine (see the TensorRT log above)")
    blob = bytes(serialized)
    engine = trt.Runtime(logger).deserialize_cuda_engine(blob)
    info = engine.create_engine_inspector().get_engine_information(trt.LayerInformationFormat.JSON)
    counts = summarize_layer_precisions(info)
    ok, why = verify_precision(precision, counts)
    engine_path = Path(engine_path)
    atomic_write_bytes(engine_path, blob)
    stamp = make_stamp(machine, precision_requested=precision, layer_precisions=counts,
                       typing="strong" if strong else "weak", onnx_sha256=file_sha256(onnx_path),
                       engine_sha256=file_sha256(engine_path), profile=profile[INPUT_NAME])
    write_stamp(engine_path, stamp)
    return {**stamp, "verified": ok, "verification": why}
