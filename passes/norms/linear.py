"""Linear readers of a value, and folding a per-channel scale and shift into them.

``(x * s + t) @ W + c  ==  x @ (diag(s) W) + (t @ W + c)``: the one identity behind
fold-norm-affine, the ``batchnorm-linear`` fold and the LayerNorm shift of preln-to-rmsnorm.
Linear readers are ``MatMul(y, W)`` (with an optional ``+ c`` after it), ``Gemm(y, B, C)`` and
either of those behind a ``Reshape`` that keeps the hidden axis last (GPT-2 writes Reshape → Gemm).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx_ir as ir

from txcompile.passes.norms.common import (
    constant,
    describe,
    is_op,
    last_dim,
    new_initializer,
    set_constant_input,
)


@dataclasses.dataclass
class LinearReader:
    """``node`` multiplies the norm's output by the constant ``weight`` (input ``weight_index``)."""

    node: ir.Node
    weight_index: int
    weight: np.ndarray  # as [D, N]
    transposed: bool  # Gemm with transB=1 stores it as [N, D]


def linear_readers(value: ir.Value) -> tuple[list[LinearReader], str | None]:
    """Every reader of ``value`` as a linear layer, or the reason one is not."""
    if value.is_graph_output():
        return [], f"{value.name} is a graph output"
    found: list[LinearReader] = []
    for node in value.consumers():
        if is_op(node, "Shape", "Size"):
            continue  # reads only the shape, which folding keeps
        if is_op(node, "Reshape") and node.inputs[0] is value:
            out = node.outputs[0]
            if last_dim(value) is None or last_dim(out) != last_dim(value):
                return [], f"{describe(node)} moves the hidden axis"
            inner, problem = linear_readers(out)
            if problem:
                return [], problem
            found.extend(inner)
            continue
        reader = _as_linear(node, value)
        if reader is None:
            return [], f"{value.name} is read by {describe(node)}, which is not a linear layer"
        found.append(reader)
    return found, None


def _as_linear(node: ir.Node, value: ir.Value) -> LinearReader | None:
    if is_op(node, "MatMul") and node.inputs[0] is value and node.inputs[1] is not value:
        weight = constant(node.inputs[1])
        if weight is not None and weight.ndim == 2:
            return LinearReader(node, 1, weight, False)
    if is_op(node, "Gemm") and node.inputs[0] is value and node.attributes.get_int("transA", 0) == 0:
        weight = constant(node.inputs[1])
        if weight is None or weight.ndim != 2:
            return None
        if len(node.inputs) > 2 and node.inputs[2] is not None:
            if constant(node.inputs[2]) is None or node.attributes.get_float("beta", 1.0) == 0.0:
                return None
        transposed = node.attributes.get_int("transB", 0) == 1
        return LinearReader(node, 1, weight.T if transposed else weight, transposed)
    return None


def fold_into_readers(
    graph: ir.Graph, readers: list[LinearReader], scale: np.ndarray | None, shift: np.ndarray | None
) -> None:
    """Give each linear reader ``diag(scale) W`` and ``+ shift @ W`` (readers from linear_readers)."""
    for reader in readers:
        weight = reader.weight.astype(np.float64)
        node = reader.node
        if scale is not None:
            scaled = (scale.astype(np.float64)[:, None] * weight).astype(reader.weight.dtype)
            set_constant_input(node, reader.weight_index, scaled.T if reader.transposed else scaled, graph)
        if shift is None or not np.any(shift):
            continue
        extra = shift.astype(np.float64) @ weight
        if is_op(node, "Gemm"):
            _add_gemm_bias(graph, node, extra)
        else:
            add_matmul_bias(graph, node, extra.astype(reader.weight.dtype))


def _add_gemm_bias(graph: ir.Graph, node: ir.Node, extra: np.ndarray) -> None:
    alpha = node.attributes.get_float("alpha", 1.0)
    dtype = constant(node.inputs[1]).dtype
    if len(node.inputs) > 2 and node.inputs[2] is not None:
        beta = node.attributes.get_float("beta", 1.0)
        old = constant(node.inputs[2]).astype(np.float64)
        set_constant_input(node, 2, (old + alpha / beta * extra).astype(dtype), graph)
        return
    node.attributes["beta"] = ir.AttrFloat32("beta", 1.0)
    node.resize_inputs(3)
    node.replace_input_with(
        2, new_initializer(graph, f"{node.name or 'gemm'}.bias", (alpha * extra).astype(dtype))
    )


def add_matmul_bias(graph: ir.Graph, node: ir.Node, extra: np.ndarray) -> None:
    """Into the constant Add that follows the MatMul, else a new Add after it."""
    out = node.outputs[0]
    readers = out.consumers()
    if len(readers) == 1 and is_op(readers[0], "Add") and not out.is_graph_output():
        add = readers[0]
        index = 1 if add.inputs[0] is out else 0
        old = constant(add.inputs[index])
        if old is not None and old.shape[-1:] == extra.shape and old.ndim == 1:
            set_constant_input(add, index, (old.astype(np.float64) + extra).astype(old.dtype), graph)
            return
    bias = new_initializer(graph, f"{node.name or 'matmul'}.bias", extra)
    uses = list(out.uses())  # taken before the new Add becomes a reader of ``out`` too
    add = ir.node("Add", [out, bias], name=f"{node.name or 'matmul'}/folded_bias")
    add.outputs[0].shape, add.outputs[0].type = out.shape, out.type
    graph.insert_after(node, add)
    for use in uses:
        use.node.replace_input_with(use.idx, add.outputs[0])
    if out.is_graph_output():
        graph.outputs[graph.outputs.index(out)] = add.outputs[0]
