"""FP16 ONNX: the learned layers in FP16, the geometry in FP32, inputs and outputs unchanged (FP32 / INT64).

Rule (why): the backbone, FPN and heads (:data:`gkd.export.adapters.NETWORK_SCOPES`) are convolutions on normalised
activations, where FP16 costs little accuracy and is what makes an FP16 engine fast. Everything else is arithmetic
on pixel coordinates (resize scale, anchors, box decoding with ``exp``, RoIAlign sampling positions, NMS IoU, the
final rescale) where FP16's 11-bit mantissa gives 0.5 px steps at 1000 px and ``exp`` overflows past 11: those
nodes, and ``NonMaxSuppression``, whose boxes the ONNX spec requires as float32, stay FP32. Casts are inserted at
the boundaries, once per tensor. Graph inputs/outputs keep their types, so every runner shares one pre/post-processing.

onnxruntime's own converter (``onnxruntime.transformers.float16``) produced invalid graphs (duplicate cast
outputs, unsorted nodes) on torchvision detectors with a node block list, hence this small rewriter.
"""
from __future__ import annotations

from collections import Counter
from typing import Any, Iterable

from ._lazy import lazy_import
from .adapters import NETWORK_SCOPES

__all__ = ["convert_fp16", "FP16_OPS", "count_tensor_types"]

#: op types computed in FP16 when they sit inside a network scope (data-movement ops included so that a chain of
#: them does not bounce through casts)
FP16_OPS = frozenset({"Conv", "ConvTranspose", "Relu", "Add", "Sub", "Mul", "Div", "MaxPool", "AveragePool",
                      "GlobalAveragePool", "Resize", "Gemm", "MatMul", "Flatten", "Reshape", "Transpose",
                      "Sigmoid", "Concat", "Squeeze", "Unsqueeze", "Identity"})
#: ops that read only their input's shape: fed whatever precision the tensor has, no cast needed
_SHAPE_ONLY = frozenset({"Shape", "Size"})


def _float_inputs(node) -> Iterable[int]:
    """Indices of a node's inputs that carry float data to convert (Resize's roi/scales must stay float32)."""
    if node.op_type == "Resize":
        return (0,)
    return range(len(node.input))


def _subgraph_refs(graph) -> set[str]:
    """Names that If/Loop bodies read from the enclosing graph (they keep seeing the FP32 tensor)."""
    refs: set[str] = set()

    def walk(g, local: set[str]):
        local = local | {i.name for i in g.input} | {i.name for i in g.initializer}
        for n in g.node:
            refs.update(i for i in n.input if i and i not in local)
            local |= set(n.output)
            for a in n.attribute:
                if a.type == a.GRAPH:
                    walk(a.g, local)

    for n in graph.node:
        for a in n.attribute:
            if a.type == a.GRAPH:
                walk(a.g, set())
    return refs


def convert_fp16(model, *, scopes: tuple[str, ...] = NETWORK_SCOPES, ops: frozenset[str] = FP16_OPS,
                 keep_fp32_nodes: Iterable[str] = ()) -> tuple[Any, dict[str, Any]]:
    """Convert an FP32 detector graph to mixed FP16/FP32.

    Args:
        model: an FP32 ``onnx.ModelProto`` from :func:`gkd.export.onnx.export_onnx` (not modified).
        scopes: node-name prefixes whose ops may run in FP16.
        ops: op types that may run in FP16.
        keep_fp32_nodes: node names forced to stay FP32 (e.g. found sensitive).

    Returns:
        ``(fp16_model, info)``; ``info`` counts FP16/FP32 nodes, inserted casts and converted weights.
    """
    onnx = lazy_import("onnx", "FP16 conversion")
    from onnx import TensorProto, helper, numpy_helper

    model = onnx.shape_inference.infer_shapes(model)  # a copy with element types for every value
    g = model.graph
    keep = set(keep_fp32_nodes)
    elem = {v.name: v.type.tensor_type.elem_type for v in list(g.value_info) + list(g.input) + list(g.output)}
    inits = {i.name: i for i in g.initializer}
    elem.update({name: i.data_type for name, i in inits.items()})
    is_float = lambda name: elem.get(name) == TensorProto.FLOAT  # noqa: E731

    nodes = list(g.node)  # hold the wrappers: protobuf may hand out new Python objects on each access
    half = {i for i, n in enumerate(nodes) if n.name.startswith(scopes) and n.op_type in ops and n.name not in keep}
    # values that become FP16 because an FP16 node produces them
    produced16 = {o for i, n in enumerate(nodes) if i in half for o in n.output if is_float(o)}
    sub_refs = _subgraph_refs(g)
    graph_outputs = {o.name for o in g.output}

    # who reads each value in FP32 (an FP32 node, a subgraph, or the graph output) / in FP16
    read32: set[str] = set(sub_refs) | graph_outputs
    read16: set[str] = set()
    for i, n in enumerate(nodes):
        data = set(_float_inputs(n))
        for k, name in enumerate(n.input):
            if not name:
                continue
            if i in half and k in data and is_float(name):
                read16.add(name)
            elif n.op_type in _SHAPE_ONLY and name in produced16:
                pass  # reads the FP16 tensor's shape directly
            else:
                read32.add(name)

    # weights: convert in place when only FP16 nodes read them, else add an FP16 copy
    converted = 0
    for name in sorted(read16 & set(inits)):
        arr = numpy_helper.to_array(inits[name]).astype("float16")
        if name in read32:
            g.initializer.append(numpy_helper.from_array(arr, name + "__fp16"))
        else:
            inits[name].CopyFrom(numpy_helper.from_array(arr, name))
        converted += 1
    inplace16 = {n for n in read16 & set(inits) if n not in read32}

    def name16(v: str) -> str:
        return v if v in inplace16 else v + "__fp16"

    new_nodes, casts, emitted = [], 0, set()
    for i, n in enumerate(nodes):
        if i in half:
            data = set(_float_inputs(n))
            for k, name in enumerate(n.input):
                if not name or k not in data or not is_float(name):
                    continue
                if name not in produced16 and name not in inits and name not in emitted:
                    new_nodes.append(helper.make_node("Cast", [name], [name + "__fp16"], to=TensorProto.FLOAT16,
                                                      name=f"{name}__cast_to_fp16"))
                    emitted.add(name)
                    casts += 1
                n.input[k] = name16(name)
            for k, name in enumerate(n.output):
                if name in produced16:
                    n.output[k] = name + "__fp16"
        elif n.op_type in _SHAPE_ONLY:
            for k, name in enumerate(n.input):
                if name in produced16 and name not in read32:
                    n.input[k] = name + "__fp16"
        new_nodes.append(n)
        if i in half:
            for name in n.output:
                base = name[: -len("__fp16")] if name.endswith("__fp16") else name
                if base in produced16 and base in read32:
                    new_nodes.append(helper.make_node("Cast", [name], [base], to=TensorProto.FLOAT,
                                                      name=f"{base}__cast_to_fp32"))
                    casts += 1
    del g.node[:]
    g.node.extend(new_nodes)
    del g.value_info[:]  # stale element types; re-inferred below
    model = onnx.shape_inference.infer_shapes(model)
    ops16 = Counter(nodes[i].op_type for i in half)
    info = {"fp16_nodes": len(half), "fp32_nodes": len(g.node) - len(half) - casts, "casts_inserted": casts,
            "weights_converted": converted, "fp16_op_types": dict(sorted(ops16.items())),
            "kept_fp32_nodes": sorted(keep),
            "rule": "learned layers (backbone, FPN, heads) in FP16; resize/normalise, anchors, box decoding, "
                    "RoIAlign, NMS and output rescaling in FP32; inputs/outputs unchanged"}
    return model, info


def count_tensor_types(model) -> dict[str, int]:
    """Initializer element types by name (``{"FLOAT": n, "FLOAT16": m, "INT8": k, ...}``): what a file really holds."""
    from onnx import TensorProto

    names = {v: k for k, v in TensorProto.DataType.items()}
    return dict(Counter(names[i.data_type] for i in model.graph.initializer))
