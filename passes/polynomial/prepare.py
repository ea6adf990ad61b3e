"""Normalize an exported graph before approximation: no NaN guards, no Div by constants, no Conv.

- ``Where(IsNaN(p), 0, p)`` (SDPA's guard for fully masked rows): polynomials never give NaN.
- ``Div(a, c)`` with a constant c is ``Mul(a, 1/c)``: one plaintext multiplication.
- A patch-embedding ``Conv`` (stride = kernel, no padding, one group) is a reshape and a MatMul.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from txcompile.graph.build import GraphBuilder
from txcompile.graph.constants import constant_array, is_constant


def remove_nan_guards(graph: ir.Graph) -> int:
    count = 0
    for node in list(graph):
        if node.op_type != "Where" or len(node.inputs) != 3:
            continue
        condition, value = node.inputs[0].producer(), node.inputs[2]
        if condition is None or condition.op_type != "IsNaN" or condition.inputs[0] is not value:
            continue
        ir.convenience.replace_all_uses_with(node.outputs[0], value, replace_graph_outputs=True)
        count += 1
    return count


def div_by_constant(graph: ir.Graph) -> int:
    count = 0
    for node in list(graph):
        if node.op_type != "Div" or not is_constant(node.inputs[1]):
            continue
        divisor = constant_array(node.inputs[1]).astype(np.float64)
        if not np.all(divisor != 0) or not np.issubdtype(divisor.dtype, np.floating):
            continue
        b = GraphBuilder(graph, f"{node.name}/as-mul", node)
        dtype = constant_array(node.inputs[1]).dtype
        out = b.op("Mul", node.inputs[0], b.const(1.0 / divisor, dtype=dtype))
        b.commit()
        ir.convenience.replace_all_uses_with(node.outputs[0], out, replace_graph_outputs=True)
        count += 1
    return count


def patch_conv_to_matmul(graph: ir.Graph) -> int:
    """Conv(x [N,C,H,W], w [O,C,k,k]) with stride k → [N,O,H/k,W/k] through one MatMul."""
    count = 0
    for node in list(graph):
        if node.op_type != "Conv" or not is_constant(node.inputs[1]):
            continue
        weight = constant_array(node.inputs[1])
        shape = node.inputs[0].shape
        attrs = {k: a.value for k, a in node.attributes.items()}
        if weight.ndim != 4 or shape is None or len(shape) != 4 or not all(isinstance(d, int) for d in shape):
            continue
        out_ch, in_ch, kh, kw = weight.shape
        if list(attrs.get("strides", [1, 1])) != [kh, kw] or any(attrs.get("pads", [0] * 4)):
            continue
        if attrs.get("group", 1) != 1 or any(d != 1 for d in attrs.get("dilations", [1, 1])):
            continue
        n, c, h, w = shape
        if h % kh or w % kw:
            continue
        gh, gw = h // kh, w // kw
        b = GraphBuilder(graph, f"{node.name}/as-matmul", node)
        i64 = np.int64
        x = b.op("Reshape", node.inputs[0], b.const([n, c, gh, kh, gw, kw], i64))
        x = b.op("Transpose", x, perm=[0, 2, 4, 1, 3, 5])
        x = b.op("Reshape", x, b.const([n, gh * gw, c * kh * kw], i64))
        y = b.op("MatMul", x, b.const(weight.reshape(out_ch, -1).T.copy(), weight.dtype))
        if len(node.inputs) > 2 and node.inputs[2] is not None:
            y = b.op("Add", y, node.inputs[2])
        y = b.op("Reshape", y, b.const([n, gh, gw, out_ch], i64))
        y = b.op("Transpose", y, perm=[0, 3, 1, 2])
        b.commit()
        ir.convenience.replace_all_uses_with(node.outputs[0], y, replace_graph_outputs=True)
        count += 1
    return count


def name_values(graph: ir.Graph) -> None:
    """Give every unnamed value a name: calibration captures values by name."""
    taken = {v.name for n in graph for v in n.outputs if v.name}
    for i, node in enumerate(graph):
        for j, value in enumerate(node.outputs):
            if not value.name:
                name = f"poly_{i}_{j}"
                while name in taken:
                    name += "_"
                value.name = name
                taken.add(name)
