"""Fold a scalar factor into the linear layer that produced a value, so scaling costs no level.

``fold_scale(v, s)`` rebuilds the chain that computes ``v`` with one constant multiplied by
``s`` (a weight, a bias, an existing scalar) and returns the new value, or None when the
chain has no such constant or an intermediate has another user. Plaintext operands are scaled
directly: they are free.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from .contract import constant_array, is_constant
from .emit import GraphBuilder

_THROUGH = {"Reshape", "Transpose", "Squeeze", "Unsqueeze", "Identity", "Flatten", "ReduceSum"}


def fold_scale(b: GraphBuilder, value: ir.Value, s: float, encrypted: set[ir.Value], depth: int = 0):
    if is_constant(value):
        return b.const(constant_array(value).astype(np.float32) * np.float32(s))
    if value not in encrypted:
        return b.op("Mul", value, b.const(s))
    node = value.producer()
    if node is None or depth > 12 or len(value.uses()) != 1 or value.is_graph_output():
        return None
    op, ins = node.op_type, list(node.inputs)
    attrs = {k: a.value for k, a in node.attributes.items()}
    if op in ("Add", "Sub"):
        left = fold_scale(b, ins[0], s, encrypted, depth + 1)
        right = fold_scale(b, ins[1], s, encrypted, depth + 1) if left is not None else None
        return None if right is None else b.op(op, left, right)
    if op == "Neg":
        inner = fold_scale(b, ins[0], s, encrypted, depth + 1)
        return None if inner is None else b.op("Neg", inner)
    if op in ("Mul", "MatMul"):
        for i in (1, 0):
            if ins[i] not in encrypted:
                scaled = fold_scale(b, ins[i], s, encrypted, depth + 1)
                return b.op(op, *(scaled if j == i else v for j, v in enumerate(ins)))
        for i in (1, 0):
            scaled = fold_scale(b, ins[i], s, encrypted, depth + 1)
            if scaled is not None:
                return b.op(op, *(scaled if j == i else v for j, v in enumerate(ins)))
        return None
    if op == "Div" and ins[1] not in encrypted:
        return b.op("Div", ins[0], fold_scale(b, ins[1], 1.0 / s, encrypted, depth + 1))
    if (
        op == "Gemm"
        and ins[1] not in encrypted
        and (len(ins) < 3 or ins[2] is None or ins[2] not in encrypted)
    ):
        scaled = [ins[0], fold_scale(b, ins[1], s, encrypted, depth + 1)]
        if len(ins) > 2 and ins[2] is not None:
            scaled.append(fold_scale(b, ins[2], s, encrypted, depth + 1))
        return b.op("Gemm", *scaled, **attrs)
    if op in _THROUGH:
        inner = fold_scale(b, ins[0], s, encrypted, depth + 1)
        return None if inner is None else b.op(op, inner, *ins[1:], **attrs)
    return None


def scaled_input(b: GraphBuilder, value: ir.Value, mid: float, half: float, encrypted: set[ir.Value]):
    """t = (value − mid)/half, folded upstream when possible; returns (t, folded)."""
    if half == 1.0:
        t, folded = value, True
    else:
        t = fold_scale(b, value, 1.0 / half, encrypted)
        folded = t is not None
        if t is None:
            t = b.op("Mul", value, b.const(1.0 / half))
    if mid:
        t = b.op("Add", t, b.const(-mid / half))
    return t, folded
