"""What an INT8 ONNX file holds, read from the file itself: which weighted layers compute in INT8, in what format,
and what share of the weights and multiply-accumulates that is.

The manifest and the report describe an INT8 file only through :func:`read_int8_record`, never through what the
quantizer was asked to do: a request and its result can differ (onnxruntime's ``quantize_static`` treats an empty
``nodes_to_quantize`` as "every node"), and a file can be edited after it was written.

A weighted layer (Conv, Gemm, MatMul with a constant weight) computes in INT8 when **both** its
activation input and its weight come out of a ``DequantizeLinear`` of an 8-bit tensor: that is the pattern
onnxruntime fuses into ``QLinearConv`` / ``QGemm`` and TensorRT into an INT8 kernel. A layer with only its weight
dequantized is "weight-only" (stored in INT8, computed in float); a layer with neither is "float".

Multiply-accumulates depend on the input size (the backbone) and on the data (Faster R-CNN's box head runs once per
proposal), so they are counted on one real image: every weighted layer's output shape is read from an onnxruntime
run of the file with those tensors exposed, and ``MACs = output elements x (input channels / groups x kernel size)``
(``M x N x K`` for a Gemm). The record names the image size it was counted at.
"""
from __future__ import annotations

import copy
import math
from typing import Any

import numpy as np
import torch

from ._lazy import lazy_import
from .adapters import INPUT_NAME

__all__ = ["activation_qparams", "read_int8_record", "weighted_layers", "layer_macs", "WEIGHTED_OPS", "INT8_MAC_FLOOR"]

WEIGHTED_OPS = ("Conv", "Gemm", "MatMul")
#: the share of Conv/Gemm multiply-accumulates that must run in INT8 for a file to be called INT8
INT8_MAC_FLOOR = 0.90

_8BIT = ("INT8", "UINT8")


def _dtype_name(elem_type: int) -> str:
    from onnx import TensorProto

    return TensorProto.DataType.Name(elem_type)


def _graph_index(model) -> tuple[dict, dict]:
    """(tensor -> producing node, initializer name -> TensorProto); Constant nodes count as initializers."""
    producer = {o: n for n in model.graph.node for o in n.output}
    inits = {i.name: i for i in model.graph.initializer}
    for n in model.graph.node:
        if n.op_type == "Constant" and n.attribute and n.attribute[0].type == n.attribute[0].TENSOR:
            inits[n.output[0]] = n.attribute[0].t
    return producer, inits


def _dequantized(tensor: str, producer: dict, inits: dict) -> dict[str, Any] | None:
    """If ``tensor`` is a DequantizeLinear output: its source's type, zero points, scale count and axis."""
    from onnx import numpy_helper

    node = producer.get(tensor)
    if node is None or node.op_type != "DequantizeLinear":
        return None
    src = node.input[0]
    if src in inits:
        dtype = _dtype_name(inits[src].data_type)
    else:  # an activation: its type is the QuantizeLinear's zero point's (or uint8, ONNX's default)
        q = producer.get(src)
        zp_name = q.input[2] if q is not None and q.op_type == "QuantizeLinear" and len(q.input) > 2 else ""
        dtype = _dtype_name(inits[zp_name].data_type) if zp_name in inits else "UINT8"
    scale = numpy_helper.to_array(inits[node.input[1]]) if node.input[1] in inits else np.array([1.0])
    zp = (numpy_helper.to_array(inits[node.input[2]]) if len(node.input) > 2 and node.input[2] in inits
          else np.zeros(1))
    axis = next((a.i for a in node.attribute if a.name == "axis"), 1)
    return {"dtype": dtype, "constant": src in inits, "scales": int(np.asarray(scale).size),
            "zero_points": sorted({int(v) for v in np.asarray(zp).reshape(-1).tolist()}), "axis": int(axis)}


def weighted_layers(model) -> list[dict[str, Any]]:
    """Every weighted layer (constant weight) with how its activation, weight and bias are stored.

    Returns:
        ``[{"node", "op", "weight", "weight_shape", "precision": "int8" | "weight-only" | "float",
        "activation": dq-info | None, "weight_q": dq-info | None, "bias": dtype | None}]`` in graph order.
    """
    producer, inits = _graph_index(model)
    out = []
    for n in model.graph.node:
        if n.op_type not in WEIGHTED_OPS or len(n.input) < 2:
            continue
        w_q = _dequantized(n.input[1], producer, inits)
        w_name = producer[n.input[1]].input[0] if w_q else n.input[1]
        if w_name not in inits:
            continue  # a product of two activations (no learned weight)
        a_q = _dequantized(n.input[0], producer, inits)
        bias = None
        if len(n.input) > 2 and n.input[2]:
            b_q = _dequantized(n.input[2], producer, inits)
            bias = b_q["dtype"] if b_q else (_dtype_name(inits[n.input[2]].data_type) if n.input[2] in inits
                                             else "computed")
        w_int8 = bool(w_q and w_q["dtype"] in _8BIT)
        a_int8 = bool(a_q and a_q["dtype"] in _8BIT)
        precision = "int8" if (w_int8 and a_int8) else ("weight-only" if w_int8 else "float")
        out.append({"node": n.name, "op": n.op_type, "weight": w_name, "weight_shape": list(inits[w_name].dims),
                    "precision": precision, "activation": a_q, "weight_q": w_q, "bias": bias,
                    "output": n.output[0], "trans_b": next((a.i for a in n.attribute if a.name == "transB"), 0)})
    return out


def layer_macs(model, layers: list[dict[str, Any]], image: torch.Tensor) -> dict[str, int]:
    """Multiply-accumulates of each layer on ``image`` (``[3, H, W]`` in [0, 1]), from an onnxruntime run.

    The run exposes each layer's output, without graph optimisations (so that no layer is fused away).
    """
    from onnx import helper

    ort = lazy_import("onnxruntime", "counting multiply-accumulates")
    m = copy.deepcopy(model)
    have = {o.name for o in m.graph.output}
    names = [layer["output"] for layer in layers]
    m.graph.output.extend(helper.make_empty_tensor_value_info(o) for o in names if o not in have)
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    opts.intra_op_num_threads = 1
    opts.log_severity_level = 3
    sess = ort.InferenceSession(m.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    shapes = dict(zip(names, (o.shape for o in sess.run(names, {INPUT_NAME: image.unsqueeze(0).numpy()}))))
    macs = {}
    for layer in layers:
        out = shapes[layer["output"]]
        w = layer["weight_shape"]
        if layer["op"] == "Conv":  # W [Cout, Cin/g, k...]: each output element sums Cin/g x k... products
            macs[layer["node"]] = int(math.prod(out)) * math.prod(w[1:])
        else:  # Gemm / MatMul: out [M, N], K from the weight
            k = w[1] if (layer["op"] == "Gemm" and layer["trans_b"]) else w[0]
            macs[layer["node"]] = int(math.prod(out)) * int(k)
    return macs


def _format(layers: list[dict[str, Any]], key: str) -> dict[str, Any] | None:
    """The quantized format of one input kind (activations or weights) over the INT8 layers."""
    infos = [layer[key] for layer in layers if layer["precision"] == "int8" and layer[key]]
    if not infos:
        return None
    dtypes = sorted({i["dtype"].lower() for i in infos})
    zps = sorted({z for i in infos for z in i["zero_points"]})
    per_channel = [i["scales"] > 1 for i in infos]
    return {"dtype": "/".join(dtypes), "symmetric": zps in ([0],) or (dtypes == ["uint8"] and zps == [128]),
            "zero_points": zps if len(zps) <= 4 else f"{len(zps)} distinct values",
            "granularity": "per-channel" if all(per_channel) else ("per-tensor" if not any(per_channel) else "mixed"),
            "axes": sorted({i["axis"] for i, pc in zip(infos, per_channel) if pc})}


def activation_qparams(model) -> dict[str, tuple[float, int]]:
    """``{tensor: (scale, zero point)}`` of every activation the file quantizes (a QuantizeLinear whose input is not a
    weight), read from its initializers."""
    from onnx import numpy_helper

    inits = {i.name: i for i in model.graph.initializer}
    out = {}
    for n in model.graph.node:
        if n.op_type == "QuantizeLinear" and n.input[0] not in inits:
            scale = float(numpy_helper.to_array(inits[n.input[1]]).reshape(-1)[0])
            zp = int(numpy_helper.to_array(inits[n.input[2]]).reshape(-1)[0]) if len(n.input) > 2 else 0
            out[n.input[0]] = (scale, zp)
    return out


def read_int8_record(model, image: torch.Tensor | None = None, floor: float = INT8_MAC_FLOOR) -> dict[str, Any]:
    """The INT8 record of an ONNX model, read from its graph (and, for MACs, from one run on ``image``).

    Args:
        model: a loaded ``onnx.ModelProto`` (the file as written).
        image: ``[3, H, W]`` float32 in [0, 1]: a real image to count multiply-accumulates on (None: weights only).
        floor: the share of MACs (of weights when no image is given) at INT8 that makes the file INT8.

    Returns:
        ``{"layers": {"int8": [...], "weight_only": [...], "float": [...]}, "counts", "weights_int8_share",
        "macs_int8_share", "macs_counted_on", "activations", "weights", "bias", "qdq_nodes", "is_int8",
        "floor", "blocking": [float layers by MACs, largest first]}``.
    """
    layers = weighted_layers(model)
    params = {lay["node"]: math.prod(lay["weight_shape"]) for lay in layers}
    macs = layer_macs(model, layers, image) if image is not None and layers else None
    int8 = [lay for lay in layers if lay["precision"] == "int8"]
    not_int8 = [lay for lay in layers if lay["precision"] != "int8"]

    def share(counts: dict[str, int] | None) -> float | None:
        if counts is None:
            return None
        total = sum(counts.values())
        return sum(counts[lay["node"]] for lay in int8) / total if total else 0.0

    biases = sorted({lay["bias"].lower() for lay in int8 if lay["bias"]})
    ops = [n.op_type for n in model.graph.node]
    decided_by = share(macs) if macs is not None else share(params)
    cost = macs if macs is not None else params
    return {
        "layers": {"int8": [lay["node"] for lay in int8],
                   "weight_only": [lay["node"] for lay in layers if lay["precision"] == "weight-only"],
                   "float": [lay["node"] for lay in layers if lay["precision"] == "float"]},
        "counts": {"weighted": len(layers), "int8": len(int8), "float": len(not_int8)},
        "weights_int8_share": share(params),
        "macs_int8_share": share(macs),
        "macs_total": sum(macs.values()) if macs is not None else None,
        "macs_counted_on": f"one {image.shape[2]}x{image.shape[1]} image" if macs is not None else None,
        "activations": _format(layers, "activation"),
        "weights": _format(layers, "weight_q"),
        "bias": "/".join(biases) if biases else None,
        "qdq_nodes": {"QuantizeLinear": ops.count("QuantizeLinear"), "DequantizeLinear": ops.count("DequantizeLinear")},
        "floor": floor,
        "share_measure": "macs" if macs is not None else "weights",
        # a file without one INT8 layer is never INT8, whatever the floor
        "is_int8": bool(int8 and decided_by is not None and decided_by >= floor),
        "blocking": [lay["node"] for lay in sorted(not_int8, key=lambda lay: -cost[lay["node"]])],
        "layer_macs": macs,
    }
