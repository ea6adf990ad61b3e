"""How each op that writes into the residual stream is centered (one handler per op type).

A handler centers the constants it owns (``plan.edit``), walks on to its inputs (``plan.plan`` /
``plan.operand``), raises ``NotCenterable`` for a write an explicit ``x - mean(x)`` must
center, and ``Refused`` when no centering keeps the graph's meaning.
"""

from __future__ import annotations

from txcompile.passes.norms.common import constant, describe, rank
from txcompile.passes.norms.stream import NotCenterable, Refused


def _add(plan, node, value, axis):
    for index in range(2):
        plan.operand(node, index, axis)


def _concat(plan, node, value, axis):
    if node.attributes.get_int("axis") % rank(value) == axis:
        # zero-mean parts make a zero-mean whole, but a LayerNorm over the whole (Swin's patch
        # merging) is not invariant to the per-part shifts that centering removes
        raise Refused(f"{describe(node)} concatenates along the hidden axis")
    for index in range(len(node.inputs)):
        plan.operand(node, index, axis)


def _slice(plan, node, value, axis):
    """Slicing tokens or positions keeps each token's mean (Swin's roll and patch merging)."""
    starts = constant(node.inputs[1])
    axes = constant(node.inputs[3]) if len(node.inputs) > 3 and node.inputs[3] is not None else None
    if starts is None or (len(node.inputs) > 3 and node.inputs[3] is not None and axes is None):
        raise NotCenterable(f"{describe(node)} slices along unknown axes")
    axes = list(range(starts.size)) if axes is None else [int(a) % rank(value) for a in axes.reshape(-1)]
    if axis in axes:
        raise NotCenterable(f"{describe(node)} slices the hidden axis")
    plan.plan(node.inputs[0], axis)


def _expand(plan, node, value, axis):
    plan.operand(node, 0, axis)


def _cast(plan, node, value, axis):
    source = node.inputs[0]
    if source.dtype is None or node.attributes.get_int("to") != source.dtype.value:
        raise Refused(f"{describe(node)} changes the stream's type")
    plan.plan(source, axis)


def _identity(plan, node, value, axis):
    plan.plan(node.inputs[0], axis)


def _transpose(plan, node, value, axis):
    perm = node.attributes.get_ints("perm", None) or list(reversed(range(rank(value))))
    plan.plan(node.inputs[0], perm[axis])


def _reshape(plan, node, value, axis):
    source, out = node.inputs[0].shape, value.shape
    if source is None or out is None:
        raise Refused(f"{describe(node)} has unknown shapes")
    if list(source)[: axis + 1] == list(out)[: axis + 1]:
        return plan.plan(node.inputs[0], axis)
    if axis == len(out) - 1 and isinstance(out[-1], int) and source[-1] == out[-1]:
        return plan.plan(node.inputs[0], len(source) - 1)
    raise Refused(f"{describe(node)} moves the hidden axis")


def _mul(plan, node, value, axis):
    for index in range(2):
        factor = constant(node.inputs[index])
        if factor is not None and factor.size == 1:
            return plan.plan(node.inputs[1 - index], axis)
    raise NotCenterable(f"{describe(node)} scales the stream per channel (the mean would not stay zero)")


def _gather(plan, node, value, axis):
    table = constant(node.inputs[0])
    if table is None or table.ndim != 2 or node.attributes.get_int("axis", 0) != 0:
        raise NotCenterable(f"{describe(node)} is not an embedding lookup in a constant table")
    if axis != rank(value) - 1:
        raise Refused(f"{describe(node)} would be centered along its index axis")
    plan.edit(node, 0, table - table.mean(axis=1, keepdims=True), "embedding table")


def _matmul(plan, node, value, axis):
    weight = constant(node.inputs[1])
    if weight is None or weight.ndim != 2 or axis != rank(value) - 1:
        raise NotCenterable(f"{describe(node)} writes into the stream with a non-constant weight")
    plan.edit(node, 1, weight - weight.mean(axis=1, keepdims=True), "projection weight")


def _gemm(plan, node, value, axis):
    weight = constant(node.inputs[1])
    if weight is None or axis != 1:
        raise NotCenterable(f"{describe(node)} writes into the stream with a non-constant weight")
    columns = 0 if node.attributes.get_int("transB", 0) else 1
    plan.edit(node, 1, weight - weight.mean(axis=columns, keepdims=True), "projection weight")
    if len(node.inputs) > 2 and node.inputs[2] is not None:
        plan.operand(node, 2, axis)


def _conv(plan, node, value, axis):
    weight = constant(node.inputs[1])
    if weight is None or axis != 1 or node.attributes.get_int("group", 1) != 1:
        raise NotCenterable(f"{describe(node)} is not a plain convolution with constant weights")
    plan.edit(node, 1, weight - weight.mean(axis=0, keepdims=True), "convolution weight")
    if len(node.inputs) > 2 and node.inputs[2] is not None:
        bias = constant(node.inputs[2])
        if bias is None:
            raise NotCenterable(f"{describe(node)} has a non-constant bias")
        plan.edit(node, 2, bias - bias.mean(), "convolution bias")


WRITERS = {
    "Add": _add,
    "Sub": _add,
    "Concat": _concat,
    "Slice": _slice,
    "Expand": _expand,
    "Cast": _cast,
    "Identity": _identity,
    "Transpose": _transpose,
    "Reshape": _reshape,
    "Mul": _mul,
    "Gather": _gather,
    "MatMul": _matmul,
    "Gemm": _gemm,
    "Conv": _conv,
}
