"""Fold a scalar factor into the linear layer that produced a value, so scaling costs no level.

``fold_scale(v, s)`` rebuilds the chain that computes ``v`` with one constant multiplied by
``s`` (a weight, a bias, an existing scalar, the table of a token lookup the client encrypts)
and returns the new value, or None when the chain has no such constant or an intermediate has
another user (besides the copies being built). Plaintext operands are scaled directly: they
are free. Given the ciphertext ``levels``, a sum whose other operand cannot be folded (a
residual shared with other users) still folds when that operand is shallow enough that
multiplying it by s keeps it within the sum's level: the copy then sits at the original's
level, as a fold would. ``fold_row_sum(v, s)`` does the same for s·Σ v over the last axis,
pushing the sum into the weights.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from txcompile.graph.build import GraphBuilder
from txcompile.graph.constants import constant_array, is_constant

_THROUGH = {"Reshape", "Transpose", "Squeeze", "Unsqueeze", "Identity", "Flatten", "ReduceSum"}


def _free_integer(value: ir.Value) -> bool:
    """A small-integer constant multiplies by additions (no level); scaling it would cost one."""
    if not is_constant(value):
        return False
    array = constant_array(value)
    return array.size > 0 and bool(np.all(array == np.round(array)) and np.all(np.abs(array) <= 8))


def _free_integer_times(value: ir.Value, s: float) -> bool:
    scaled = constant_array(value) * s
    return bool(np.all(scaled == np.round(scaled)) and np.all(np.abs(scaled) <= 8))


def _shallow(value: ir.Value, levels, ceiling: int | None) -> bool:
    """A multiply of value stays at or below ``ceiling`` (the enclosing sum's level)."""
    return levels is not None and ceiling is not None and value in levels and levels[value] + 1 <= ceiling


def fold_scale(
    b: GraphBuilder, value: ir.Value, s: float, encrypted: set[ir.Value], depth: int = 0, levels=None
):
    """s·value rebuilt at value's level (or None); ``levels`` enables the shallow-operand rule."""
    if is_constant(value):
        return b.const(constant_array(value).astype(np.float32) * np.float32(s))
    if value not in encrypted:
        return b.op("Mul", value, b.const(s))
    node = value.producer()
    if node is None or depth > 12 or b.outside_uses(value) != 1 or value.is_graph_output():
        return None
    op, ins = node.op_type, list(node.inputs)
    attrs = {k: a.value for k, a in node.attributes.items()}

    def inner(v: ir.Value):
        return fold_scale(b, v, s, encrypted, depth + 1, levels)

    if op in ("Add", "Sub"):
        ceiling = levels.get(value) if levels is not None else None
        sides = []
        for v in ins:
            scaled = inner(v)
            if scaled is None and _shallow(v, levels, ceiling):
                scaled = b.op("Mul", v, b.const(s))
            if scaled is None:
                return None
            sides.append(scaled)
        return b.op(op, *sides)
    if op == "Neg":
        scaled = inner(ins[0])
        return None if scaled is None else b.op("Neg", scaled)
    if op == "Gather" and is_constant(ins[0]):  # the client looks up and encrypts a scaled table
        return b.op("Gather", inner(ins[0]), *ins[1:], **attrs)
    if op in ("Mul", "MatMul"):
        for i in (1, 0):
            if ins[i] not in encrypted:
                if op == "Mul" and _free_integer(ins[i]) and not _free_integer_times(ins[i], s):
                    break  # k·x costs no level, (k·s)·x would: fold into x instead
                scaled = inner(ins[i])
                return b.op(op, *(scaled if j == i else v for j, v in enumerate(ins)))
        for i in (1, 0):
            scaled = inner(ins[i]) if ins[i] in encrypted else None
            if scaled is not None:
                return b.op(op, *(scaled if j == i else v for j, v in enumerate(ins)))
        return None
    if op == "Div" and ins[1] not in encrypted:
        return b.op("Div", ins[0], fold_scale(b, ins[1], 1.0 / s, encrypted, depth + 1, levels))
    if (
        op == "Gemm"
        and ins[1] not in encrypted
        and (len(ins) < 3 or ins[2] is None or ins[2] not in encrypted)
    ):
        scaled = [ins[0], inner(ins[1])]
        if len(ins) > 2 and ins[2] is not None:
            scaled.append(inner(ins[2]))
        return b.op("Gemm", *scaled, **attrs)
    if op in _THROUGH:
        scaled = inner(ins[0])
        return None if scaled is None else b.op(op, scaled, *ins[1:], **attrs)
    return None


def scaled_input(
    b: GraphBuilder, value: ir.Value, mid: float, half: float, encrypted: set[ir.Value], levels=None
):
    """t = (value − mid)/half, folded upstream when possible; returns (t, folded)."""
    if half == 1.0:
        t, folded = value, True
    else:
        t = fold_scale(b, value, 1.0 / half, encrypted, levels=levels)
        folded = t is not None
        if t is None:
            t = b.op("Mul", value, b.const(1.0 / half))
    if mid:
        t = b.op("Add", t, b.const(-mid / half))
    return t, folded


def fold_row_sum(
    b: GraphBuilder, value: ir.Value, s: float, encrypted: set[ir.Value], depth: int = 0, levels=None
):
    """s·ReduceSum(value, last axis) at value's level, the sum pushed into the producer: x·W
    sums to x·(W·1), a [K, 1] column, so a LayerNorm's mean costs a matrix-vector product,
    not a second copy of its linear layer. None when the chain does not allow it."""
    if is_constant(value):
        array = constant_array(value).astype(np.float64)
        return b.const((array * s).sum(-1, keepdims=True), np.float32) if array.ndim else None
    if value not in encrypted:
        return b.op("Mul", _row_total(b, value), b.const(s))
    node = value.producer()
    if node is None or depth > 12 or b.outside_uses(value) != 1 or value.is_graph_output():
        return None
    op, ins = node.op_type, list(node.inputs)

    def inner(v: ir.Value, c: float = s):
        return fold_row_sum(b, v, c, encrypted, depth + 1, levels)

    if op in ("Add", "Sub"):
        if not all(_last_dim(v) == _last_dim(value) is not None for v in ins):
            return None  # a broadcast operand would count n times
        ceiling = levels.get(value) if levels is not None else None
        sides = []
        for v in ins:
            total = inner(v)
            if total is None and _shallow(v, levels, ceiling):
                total = b.op("Mul", _row_total(b, v), b.const(s))
            if total is None:
                return None
            sides.append(total)
        return b.op(op, *sides)
    if op == "Neg":
        total = inner(ins[0])
        return None if total is None else b.op("Neg", total)
    if op in ("Mul", "Div") and is_constant(ins[1]) and constant_array(ins[1]).size == 1:
        c = float(constant_array(ins[1]).ravel()[0])
        factor = c if op == "Mul" else 1.0 / c
        if op == "Mul" and _free_integer(ins[1]):  # k·x is additions: s must ride further up
            return inner(ins[0], s * factor)
        total = inner(ins[0], 1.0)  # the scalar multiply was paid for: s·c rides on it
        return None if total is None else b.op("Mul", total, b.const(s * factor))
    if op == "MatMul" and ins[1] not in encrypted:  # Σ_n (xW)_n = x·(s·W·1)
        column = inner(ins[1])
        return None if column is None else b.op("MatMul", ins[0], column)
    if op == "MatMul" and s == 1.0:  # Σ_n (AB)_n = A·(B·1)
        return b.op("MatMul", ins[0], _row_total(b, ins[1]))
    if op == "MatMul":  # the scalar folded into A or B
        scaled = fold_scale(b, ins[0], s, encrypted, depth + 1, levels)
        if scaled is not None:
            return b.op("MatMul", scaled, _row_total(b, ins[1]))
        scaled = fold_scale(b, ins[1], s, encrypted, depth + 1, levels)
        return None if scaled is None else b.op("MatMul", ins[0], _row_total(b, scaled))
    if op == "Gather" and is_constant(ins[0]):  # the client looks up pre-summed rows
        attrs = {k: a.value for k, a in node.attributes.items()}
        axis = attrs.get("axis", 0)
        if axis % max(constant_array(ins[0]).ndim, 1) == constant_array(ins[0]).ndim - 1:
            return None
        return b.op("Gather", inner(ins[0]), *ins[1:], **attrs)
    return None


def _last_dim(value: ir.Value, depth: int = 0) -> int | None:
    """The size of value's last axis: its shape, else read off the linear chain producing it."""
    if is_constant(value):
        shape = constant_array(value).shape
        return shape[-1] if shape else 1
    shape = value.shape
    if shape is not None and len(shape) and isinstance(shape[-1], int):
        return shape[-1]
    node = value.producer()
    if node is None or depth > 12:
        return None
    if node.op_type == "MatMul":
        return _last_dim(node.inputs[1], depth + 1)
    if node.op_type in ("Add", "Sub", "Mul", "Div", "Neg"):
        dims = [_last_dim(v, depth + 1) for v in node.inputs]
        return None if None in dims else max(dims)  # broadcasting: 1 or n gives n
    return None


def _row_total(b: GraphBuilder, value: ir.Value) -> ir.Value:
    return b.op("ReduceSum", value, b.const([-1], np.int64), keepdims=1)
