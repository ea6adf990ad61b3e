"""Folding a per-channel scale and shift into the layer that writes a BatchNorm's input.

Each fold is read first (``*_fold`` returns a plan, or None when the layer does not fit) and
applied after, so a rule's check can ask without changing the graph.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx_ir as ir

from txcompile.passes.norms.common import constant, is_op, new_initializer, set_constant_input, single_reader
from txcompile.passes.norms.linear import add_matmul_bias


def bn_affine(node: ir.Node) -> tuple[np.ndarray, np.ndarray] | str:
    """(s, t) of an inference BatchNormalization in float64, or why it has none."""
    if node.attributes.get_int("training_mode", 0) != 0 or len(node.outputs) > 1:
        return "it runs in training mode"
    arrays = [constant(v) for v in node.inputs[1:5]]
    if any(a is None for a in arrays):
        return "its statistics or affine parameters are not constants"
    gamma, beta, mean, var = (a.astype(np.float64).reshape(-1) for a in arrays)
    scale = gamma / np.sqrt(var + node.attributes.get_float("epsilon", 1e-5))
    return scale, beta - mean * scale


def conv_fits(conv: ir.Node, scale: np.ndarray) -> bool:
    weight = constant(conv.inputs[1])
    if weight is None or weight.shape[0] != scale.size:
        return False
    has_bias = len(conv.inputs) > 2 and conv.inputs[2] is not None
    return not has_bias or constant(conv.inputs[2]) is not None


def fold_into_conv(graph: ir.Graph, conv: ir.Node, scale: np.ndarray, shift: np.ndarray) -> None:
    """Scale the Conv's output channels, shift its bias (conv_fits said it can)."""
    weight = constant(conv.inputs[1])
    has_bias = len(conv.inputs) > 2 and conv.inputs[2] is not None
    bias = constant(conv.inputs[2]) if has_bias else np.zeros(scale.size, weight.dtype)
    shape = (-1,) + (1,) * (weight.ndim - 1)
    set_constant_input(conv, 1, (weight * scale.reshape(shape)).astype(weight.dtype), graph)
    new_bias = (bias.astype(np.float64) * scale + shift).astype(weight.dtype)
    if has_bias:
        set_constant_input(conv, 2, new_bias, graph)
    else:
        conv.resize_inputs(3)
        conv.replace_input_with(2, new_initializer(graph, f"{conv.name or 'conv'}.bias", new_bias))


@dataclasses.dataclass
class LinearFold:
    """MatMul (+ the constant Add after it, whose bias is input ``bias_at``) or Gemm."""

    node: ir.Node
    add: ir.Node | None = None
    bias_at: int | None = None


def linear_fold(node: ir.Node | None, scale: np.ndarray) -> LinearFold | None:
    """How to scale the output columns of MatMul(+const Add) / Gemm ``node``; None when it does not fit."""
    if node is None:
        return None
    add = None
    if is_op(node, "Add"):
        add, node = node, next((v.producer() for v in node.inputs if constant(v) is None), None)
        if node is None or single_reader(node.outputs[0]) is not add:
            return None
    if is_op(node, "MatMul"):
        weight = constant(node.inputs[1])
        if weight is None or weight.ndim != 2 or weight.shape[1] != scale.size:
            return None
        if add is None:
            return LinearFold(node)
        bias_at = 1 if add.inputs[0] is node.outputs[0] else 0
        bias = constant(add.inputs[bias_at])
        return LinearFold(node, add, bias_at) if bias is not None and bias.ndim == 1 else None
    if is_op(node, "Gemm") and add is None:
        weight = constant(node.inputs[1])
        transposed = node.attributes.get_int("transB", 0) == 1
        if weight is None or (weight.shape[0] if transposed else weight.shape[1]) != scale.size:
            return None
        has_c = len(node.inputs) > 2 and node.inputs[2] is not None
        c = constant(node.inputs[2]) if has_c else np.zeros(scale.size, weight.dtype)
        beta = node.attributes.get_float("beta", 1.0)
        if c is None or (has_c and beta == 0.0) or c.shape[-1:] != scale.shape:
            return None
        return LinearFold(node)
    return None


def fold_into_linear(graph: ir.Graph, fold: LinearFold, scale: np.ndarray, shift: np.ndarray) -> None:
    node = fold.node
    weight = constant(node.inputs[1])
    if is_op(node, "MatMul"):
        set_constant_input(node, 1, (weight * scale[None, :]).astype(weight.dtype), graph)
        if fold.add is None:
            add_matmul_bias(graph, node, shift.astype(weight.dtype))
        else:
            bias = constant(fold.add.inputs[fold.bias_at])
            set_constant_input(fold.add, fold.bias_at, (bias * scale + shift).astype(bias.dtype), graph)
        return
    transposed = node.attributes.get_int("transB", 0) == 1
    beta = node.attributes.get_float("beta", 1.0)
    has_c = len(node.inputs) > 2 and node.inputs[2] is not None
    c = constant(node.inputs[2]) if has_c else np.zeros(scale.size, weight.dtype)
    scaled = weight * (scale[:, None] if transposed else scale[None, :])
    set_constant_input(node, 1, scaled.astype(weight.dtype), graph)
    beta = beta if has_c else 1.0
    new_c = (c.astype(np.float64) * scale + shift / beta).astype(weight.dtype)
    node.attributes["beta"] = ir.AttrFloat32("beta", beta)
    if has_c:
        set_constant_input(node, 2, new_c, graph)
    else:
        node.resize_inputs(3)
        node.replace_input_with(2, new_initializer(graph, f"{node.name or 'gemm'}.bias", new_c))
