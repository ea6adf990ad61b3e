"""Model statistics for reports: parameters, op histogram, FLOPs per op type.

FLOPs are counted at the verification shapes, which are observed by running the model in
onnxruntime with every intermediate value exposed, so they hold for any op ORT can run.
"""

from __future__ import annotations

import collections
import math

import numpy as np
import onnx

from txcompile.graph import ort as rt
from txcompile.graph import placeholders

_ATTENTION_OPS = {"Attention", "MultiHeadAttention", "GroupQueryAttention"}


def parameter_counts(model: onnx.ModelProto) -> dict[str, int]:
    elements = 0
    size = 0
    for tensor in model.graph.initializer:
        count = math.prod(tensor.dims)
        elements += count
        size += count * onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize
    return {"parameters": elements, "parameter_bytes": size, "initializers": len(model.graph.initializer)}


def observed_shapes(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> dict[str, tuple[int, ...]]:
    """Shape of every tensor in the main graph for these inputs (weights that cannot reach a
    shape are not read: placeholders.py)."""
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    known = {o.name for o in probe.graph.output}
    for node in probe.graph.node:
        for name in node.output:
            if name and name not in known:
                probe.graph.output.add(name=name)
                known.add(name)
    placeholders.replace_weights(probe)
    session = rt.create_session(probe, optimize=False, prepack=False)
    outputs = rt.run(session, feeds)
    shapes = {name: tuple(np.shape(v)) for name, v in outputs.items()}
    shapes.update({name: tuple(v.shape) for name, v in feeds.items()})
    shapes.update({t.name: tuple(t.dims) for t in model.graph.initializer})
    return shapes


def node_flops(node: onnx.NodeProto, shapes: dict[str, tuple[int, ...]]) -> int:
    """Multiply-adds count twice; other ops one FLOP per output element."""

    def shape(i: int, of=node.input) -> tuple[int, ...] | None:
        return shapes.get(of[i]) if i < len(of) and of[i] else None

    out = shape(0, node.output)
    if out is None:
        return 0
    if node.op_type in ("MatMul", "MatMulInteger", "FusedMatMul") and shape(0):
        return 2 * math.prod(out) * shape(0)[-1]
    if node.op_type == "Gemm" and shape(0):
        trans_a = any(a.name == "transA" and a.i for a in node.attribute)
        return 2 * math.prod(out) * shape(0)[0 if trans_a else -1]
    if node.op_type in ("Conv", "ConvInteger") and shape(1):
        return 2 * math.prod(out) * math.prod(shape(1)[1:])
    if node.op_type in _ATTENTION_OPS and shape(0) and len(shape(0)) == 3:
        return _attention_flops(node, shape)
    return math.prod(out)


def _attention_flops(node, shape) -> int:
    batch, seq, width = shape(0)
    flops = 0
    if node.op_type == "Attention" and node.domain == "com.microsoft" and shape(1):
        flops += 2 * batch * seq * width * shape(1)[-1]  # packed QKV projection
        width = shape(1)[-1] // 3
    key = shape(1) if node.op_type != "Attention" or node.domain != "com.microsoft" else None
    kv_seq = key[1] if key and len(key) == 3 else seq
    return flops + 4 * batch * seq * kv_seq * width


def flops_by_op(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> dict[str, int]:
    shapes = observed_shapes(model, feeds)
    totals: collections.Counter[str] = collections.Counter()
    for node in model.graph.node:
        key = node.op_type if node.domain in ("", "ai.onnx") else f"{node.domain}.{node.op_type}"
        totals[key] += node_flops(node, shapes)
    return dict(sorted(totals.items(), key=lambda kv: -kv[1]))
