"""ONNX export of a whole torchvision detector (pre- and post-processing included) with standard operators only.

Exporter choice (measured with torch 2.14 / torchvision 0.29): the dynamo exporter fails on full detectors (a
data-dependent guard in ``batched_nms``), so this uses the legacy TorchScript exporter (``dynamo=False``), default
opset 17, with dynamic height/width and a batch fixed at 1. Every file is written to a temporary file in the target
folder, checked (``onnx.checker`` with ``full_check``, no custom operator domain) and only then renamed into place:
a failed export leaves nothing behind.

Never run this file as a script (``python export/onnx.py``): its folder would shadow the real ``onnx`` package.
"""
from __future__ import annotations

import contextlib
import json
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from gkd.core.errors import GkdError
from gkd.core.io import atomic_write, file_sha256

from ._lazy import lazy_import
from .adapters import INPUT_NAME, OUTPUT_NAMES, ExportWrapper

__all__ = ["export_onnx", "load_onnx", "save_onnx", "read_metadata", "file_sha256", "DEFAULT_OPSET", "EXPORTER",
           "SUPPORTED_OPSETS", "STANDARD_DOMAINS"]

#: which exporter writes the graphs, and why (recorded in every export's metadata and export.json)
EXPORTER = {"api": "torch.onnx.export(dynamo=False)", "kind": "TorchScript-based (legacy) exporter",
            "why": "the dynamo exporter fails on whole torchvision detectors (a data-dependent guard in batched_nms; "
                   "pytorch/vision issues 9306 and 9462); the legacy one is deprecated but exports them with "
                   "dynamic H/W"}
DEFAULT_OPSET = 17
#: 16 is the first opset whose RoiAlign has the half-pixel mode torchvision needs; 20 is the newest the legacy
#: exporter emits for these models
SUPPORTED_OPSETS = (16, 17, 18, 19, 20)
#: "" and "ai.onnx" are the standard operator set; anything else would need a plugin or custom kernel
STANDARD_DOMAINS = ("", "ai.onnx")
METADATA_KEY = "gkd.metadata"


def load_onnx(path: str | Path, what: str = "ONNX file"):
    """Load and structurally check an ONNX file; one-line GkdError when it is missing, corrupt or invalid."""
    onnx = lazy_import("onnx", "reading ONNX files")
    path = Path(path)
    if not path.is_file():
        raise GkdError(f"{path}: {what} not found")
    try:
        model = onnx.load(str(path))
        onnx.checker.check_model(model)
    except Exception as exc:  # protobuf DecodeError, ValidationError, truncated files: all mean "not a valid ONNX"
        msg = str(exc).splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise GkdError(f"{path}: not a valid {what} (corrupt, truncated or not ONNX): {msg[:200]}") from None
    return model


def _check_model(model, where: str) -> None:
    onnx = lazy_import("onnx")
    custom = sorted({n.domain for n in _all_nodes(model.graph) if n.domain not in STANDARD_DOMAINS})
    if custom:
        raise GkdError(f"{where}: the graph uses custom operator domains {custom}; only standard ONNX ops are allowed")
    try:
        onnx.checker.check_model(model, full_check=True)
    except onnx.checker.ValidationError as exc:
        raise GkdError(f"{where}: onnx.checker rejected the graph: {str(exc).splitlines()[0]}") from None


def _all_nodes(graph):
    """Nodes of a graph and of every subgraph (If/Loop bodies)."""
    for node in graph.node:
        yield node
        for attr in node.attribute:
            if attr.type == attr.GRAPH:
                yield from _all_nodes(attr.g)
            for g in attr.graphs:
                yield from _all_nodes(g)


def _literal_zero_reshapes(model) -> int:
    """Give every Reshape with a runtime-computed target shape ``allowzero=1``; returns how many were changed.

    Why: the legacy exporter writes ``allowzero=0``, where a 0 in the target shape means "copy the input's dim".
    torchvision's box decoding reshapes to a shape read from the tensor itself, so when a pyramid level has no
    candidate above the score threshold the target is ``[0, -1]``-like and onnxruntime fails ("cannot be reshaped")
    where PyTorch returns an empty tensor. PyTorch's 0 is always a literal 0, which is what ``allowzero=1`` means
    (opset >= 14), so this restores PyTorch's semantics. Constant target shapes are left alone.
    """
    from onnx import helper

    consts = {i.name for i in model.graph.initializer}
    changed = 0
    for node in _all_nodes(model.graph):
        if node.op_type == "Constant":
            consts.update(node.output)
    for node in _all_nodes(model.graph):
        if node.op_type != "Reshape" or len(node.input) < 2 or node.input[1] in consts:
            continue
        attrs = [a for a in node.attribute if a.name == "allowzero"]
        if attrs:
            if attrs[0].i != 1:
                attrs[0].i = 1
                changed += 1
        else:
            node.attribute.append(helper.make_attribute("allowzero", 1))
            changed += 1
    return changed


def _row_scatters_as_scatternd(model) -> int:
    """Rewrite torchvision's MultiScaleRoIAlign level merge as ``ScatterND``; returns how many were rewritten.

    Why: tracing ``_onnx_merge_levels`` gives ``ScatterElements(zeros, Expand(Reshape(idx, [-1, 1, 1, 1])),
    pooled, axis=0)``: one index per element of a ``[num_rois, 256, 7, 7]`` tensor. onnxruntime's CPU kernel walks
    them one by one (a third of Faster R-CNN's time at 1000 proposals). Every index along the other axes is the same,
    so it is a row scatter: ``ScatterND(zeros, Reshape(idx, [-1, 1]), pooled)`` is equal and copies whole rows.
    """
    import numpy as np
    from onnx import helper, numpy_helper

    g = model.graph
    prod = {o: n for n in g.node for o in n.output}
    consts = {i.name: numpy_helper.to_array(i) for i in g.initializer}
    for n in g.node:
        if n.op_type == "Constant" and n.attribute and n.attribute[0].type == n.attribute[0].TENSOR:
            consts[n.output[0]] = numpy_helper.to_array(n.attribute[0].t)
    shape_name = "gkd_row_index_shape"
    changed = 0
    for node in g.node:
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        if node.op_type != "ScatterElements" or attrs.get("axis", 0) != 0 or attrs.get("reduction", b"none") not in (
                b"none", "none"):
            continue
        expand = prod.get(node.input[1])
        reshape = prod.get(expand.input[0]) if expand is not None and expand.op_type == "Expand" else None
        if reshape is None or reshape.op_type != "Reshape":
            continue
        target = consts.get(reshape.input[1])
        if target is None or target.ndim != 1 or target[0] != -1 or not np.all(target[1:] == 1):
            continue
        if shape_name not in consts:
            g.initializer.append(numpy_helper.from_array(np.array([-1, 1], dtype=np.int64), shape_name))
            consts[shape_name] = np.array([-1, 1])
        rows = node.output[0] + "__row_index"
        idx = helper.make_node("Reshape", [reshape.input[0], shape_name], [rows], name=node.name + "__row_index")
        new = helper.make_node("ScatterND", [node.input[0], rows, node.input[2]], list(node.output),
                               name=node.name + "__as_scatternd")
        node.CopyFrom(new)
        g.node.insert(list(g.node).index(node), idx)
        changed += 1
    return changed


def _drop_dead_nodes(model) -> int:
    """Remove nodes whose outputs nothing reads (left over by rewrites); returns how many were removed."""
    g = model.graph
    removed = 0
    while True:
        used = {o.name for o in g.output}
        for n in _all_nodes(g):
            used.update(n.input)
        dead = [n for n in g.node if not any(o in used for o in n.output)]
        if not dead:
            return removed
        keep = [n for n in g.node if any(o in used for o in n.output)]
        del g.node[:]
        g.node.extend(keep)
        removed += len(dead)


def _resize_as_eager(image, self_min_size, self_max_size, target=None, fixed_size=None):
    """torchvision's ``_resize_image_and_masks`` for tracing, with the output size computed as eager PyTorch does.

    Why: eagerly, torchvision computes the resize scale and the output size ``floor(H * scale)`` in Python floats
    (float64). Traced for ONNX, it computes both in float32, and ``floor`` then lands one pixel lower or higher for
    about one image size in five (e.g. 879x710 at 128 px: 127x103 traced, 128x103 eager). A one-pixel different
    resize moves every score by up to ~0.1: exported models disagreed with PyTorch on real photos while agreeing
    on images at the model size. Here the scale and the size are computed in float64 inside the graph (as 1-D
    tensors: the legacy exporter casts 0-dim float64 constants to float32), so the exported size is eager's, and
    the bilinear resize then matches it (ONNX Resize with ``sizes`` uses scale = out / in, as PyTorch does with
    ``recompute_scale_factor=True``).
    """
    import torchvision
    from torchvision.models.detection import transform

    if fixed_size is not None or target is not None or not torchvision._is_tracing():
        return _TORCHVISION_RESIZE(image, self_min_size, self_max_size, target, fixed_size)
    shape = transform._get_shape_onnx(image).to(torch.float64)  # [2]: H, W of this image, traced
    limits = torch.tensor([float(self_min_size), float(self_max_size)], dtype=torch.float64)
    scale = torch.div(limits, torch.stack([shape.min(), shape.max()])).min()
    size = torch.floor(shape * scale).to(torch.int64)
    return torch._C._nn.upsample_bilinear2d(image[None], [size[0], size[1]], False, None)[0], target


_TORCHVISION_RESIZE = None


@contextlib.contextmanager
def _eager_resize_arithmetic():
    """Trace detectors with :func:`_resize_as_eager` in place of torchvision's resize (restored afterwards)."""
    global _TORCHVISION_RESIZE
    from torchvision.models.detection import transform

    _TORCHVISION_RESIZE = transform._resize_image_and_masks
    transform._resize_image_and_masks = _resize_as_eager
    try:
        yield
    finally:
        transform._resize_image_and_masks = _TORCHVISION_RESIZE


def read_metadata(model_or_path) -> dict[str, Any]:
    """The gkd metadata (pre-processing contract, precision, provenance) stored in an ONNX file's metadata_props."""
    model = load_onnx(model_or_path) if isinstance(model_or_path, (str, Path)) else model_or_path
    for prop in model.metadata_props:
        if prop.key == METADATA_KEY:
            return json.loads(prop.value)
    return {}


def _set_metadata(model, metadata: dict[str, Any]) -> None:
    keep = [p for p in model.metadata_props if p.key != METADATA_KEY]
    del model.metadata_props[:]
    model.metadata_props.extend(keep)
    prop = model.metadata_props.add()
    prop.key, prop.value = METADATA_KEY, json.dumps(metadata, sort_keys=True)


def save_onnx(model, path: str | Path, metadata: dict[str, Any] | None = None) -> Path:
    """Check ``model`` (checker, standard domains), stamp ``metadata`` and write it atomically to ``path``."""
    onnx = lazy_import("onnx")
    path = Path(path)
    if metadata is not None:
        _set_metadata(model, metadata)
    _check_model(model, str(path))
    return atomic_write(path, lambda tmp: onnx.save(model, str(tmp)))


def export_onnx(detector: nn.Module, path: str | Path, sample: torch.Tensor, *, opset: int = DEFAULT_OPSET,
                metadata: dict[str, Any] | None = None, static: bool = False) -> Path:
    """Export a torchvision detector to ONNX (FP32) with named I/O and dynamic H/W.

    ``static`` writes the TensorRT-ready graph (:class:`gkd.export.static_graph.StaticDetector`): dynamic batch, H
    and W, fixed-size outputs ``num_detections, detection_boxes, detection_scores, detection_classes,
    nms_converged``, no data-dependent shape. Otherwise the graph is torchvision's own inference path (batch 1,
    ``boxes, scores, labels`` of data-dependent length).

    Args:
        detector: torchvision FasterRCNN or RetinaNet (eval mode, CPU).
        path: the ``.onnx`` file to write (atomically).
        sample: ``[1, 3, H, W]`` float32 image in [0, 1] used for tracing; use a real image, so that the traced
            branches are the ones real data takes.
        opset: ONNX opset, one of :data:`SUPPORTED_OPSETS`.
        metadata: JSON-serialisable dict stored under ``metadata_props["gkd.metadata"]`` (the contract).

    Returns:
        The written path.
    """
    onnx = lazy_import("onnx", "ONNX export")
    if opset not in SUPPORTED_OPSETS:
        raise GkdError(f"opset {opset} is not supported; expected one of {list(SUPPORTED_OPSETS)}")
    if sample.dim() != 4 or sample.shape[0] != 1 or sample.shape[1] != 3:
        raise GkdError(f"sample image must be [1, 3, H, W], got {list(sample.shape)}")
    path = Path(path)
    if static:
        from .static_graph import STATIC_OUTPUT_NAMES, StaticDetector

        wrapper, names = StaticDetector(detector), list(STATIC_OUTPUT_NAMES)
        dynamic = {INPUT_NAME: {0: "batch", 2: "height", 3: "width"}, **{n: {0: "batch"} for n in names}}
    else:
        wrapper, names = ExportWrapper(detector), list(OUTPUT_NAMES)
        dynamic = {INPUT_NAME: {2: "height", 3: "width"}, **{name: {0: "num_detections"} for name in OUTPUT_NAMES}}

    def write(tmp: Path) -> None:
        with warnings.catch_warnings(), torch.no_grad(), _eager_resize_arithmetic():
            # The legacy exporter is deprecated and the tracer warns about every Python-side shape computation in
            # torchvision's transform; both are expected (see docs/export.md), so keep the user's console clean.
            warnings.simplefilter("ignore")
            try:
                torch.onnx.export(wrapper, (sample,), str(tmp), dynamo=False, opset_version=opset,
                                  input_names=[INPUT_NAME], output_names=names, dynamic_axes=dynamic,
                                  do_constant_folding=True)
            except Exception as exc:
                raise GkdError(f"{path}: ONNX export failed: {str(exc).splitlines()[0][:300]}") from None
        model = onnx.load(str(tmp))
        _literal_zero_reshapes(model)
        if _row_scatters_as_scatternd(model):
            _drop_dead_nodes(model)
        if metadata is not None:
            _set_metadata(model, metadata)
        _check_model(model, str(path))
        onnx.save(model, str(tmp))

    return atomic_write(path, write)
