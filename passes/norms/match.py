"""Find decomposed LayerNorm and RMSNorm in the orders the exporters write them.

Anchored on the mean of squares, ``ReduceMean(Pow(d, 2) | Mul(d, d))`` over the last axis:

* LayerNorm (TorchScript below opset 17, hand-written LNs): ``d = Sub(x, ReduceMean(x))``,
  then ``Div(d, Sqrt(var + eps))`` or ``Mul(d, Reciprocal(Sqrt(...)))``, ``* w + b``.
* RMSNorm, LLaMA / T5 / Gemma: ``d = x``; dynamo writes ``Mul(x, Reciprocal(Sqrt(ms + eps)))``,
  TorchScript ``Mul(x, Div(1, Sqrt(ms + eps)))``; a no-op ``Cast`` may sit before ``* w``, and
  Gemma's weight is ``1 + w`` (folded here when both are constants).

A candidate that does not match says why (``Mismatch``), so the report can list it.
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
    reduces_last_axis,
    scalar,
    single_reader,
)

FLOAT_TYPES = {ir.DataType.FLOAT, ir.DataType.DOUBLE, ir.DataType.FLOAT16, ir.DataType.BFLOAT16}


@dataclasses.dataclass
class Decomposed:
    """One decomposed norm: ``output = normalize(x) * scale + bias`` built from ``nodes``."""

    kind: str  # "layer" or "rms"
    x: ir.Value
    output: ir.Value
    epsilon: float
    scale: np.ndarray
    bias: np.ndarray | None
    nodes: list[ir.Node]
    scale_value: ir.Value | None
    form: str


@dataclasses.dataclass
class Mismatch:
    """A mean of squares that does not complete a norm of ``kind``, and why."""

    anchor: ir.Node
    reason: str
    kind: str = "rms"


def _other(node: ir.Node, value: ir.Value) -> ir.Value | None:
    """The input of a binary node that is not ``value``."""
    a, b = node.inputs[0], node.inputs[1]
    return b if a is value else a if b is value else None


def _squared(node: ir.Node) -> ir.Value | None:
    """``d`` when ``node`` is Pow(d, 2) or Mul(d, d)."""
    if is_op(node, "Pow") and scalar(node.inputs[1]) == 2.0:
        return node.inputs[0]
    if is_op(node, "Mul") and node.inputs[0] is node.inputs[1]:
        return node.inputs[0]
    return None


def match(anchor: ir.Node) -> Decomposed | Mismatch | None:
    """The norm whose mean-of-squares is ``anchor``; None when ``anchor`` is no such mean."""
    if not reduces_last_axis(anchor):
        return None
    square = anchor.inputs[0].producer()
    d = _squared(square) if square is not None else None
    if d is None:
        return None
    nodes = [square, anchor]
    kind, x = "rms", d
    centering = d.producer()
    if is_op(centering, "Sub") and is_op(centering.inputs[1].producer(), "ReduceMean"):
        mean = centering.inputs[1].producer()
        if mean.inputs[0] is centering.inputs[0] and reduces_last_axis(mean):
            kind, x = "layer", centering.inputs[0]
            nodes = [mean, centering, *nodes]
    if x.dtype is not None and x.dtype not in FLOAT_TYPES:
        return Mismatch(anchor, f"input {x.name} is {x.dtype}, not a float type", kind)
    current = anchor.outputs[0]
    step = single_reader(current)
    epsilon = 0.0
    if is_op(step, "Add"):
        epsilon = scalar(_other(step, current))
        if epsilon is None:
            return Mismatch(anchor, f"{describe(step)} adds a non-constant epsilon", kind)
        nodes.append(step)
        current = step.outputs[0]
        step = single_reader(current)
    if not is_op(step, "Sqrt"):
        return Mismatch(anchor, f"the variance {current.name} does not feed one Sqrt", kind)
    nodes.append(step)
    std = step.outputs[0]
    step = single_reader(std)
    if is_op(step, "Div") and step.inputs[0] is d and step.inputs[1] is std:
        nodes.append(step)
    else:
        if is_op(step, "Reciprocal"):
            nodes.append(step)
        elif is_op(step, "Div") and step.inputs[1] is std and scalar(step.inputs[0]) == 1.0:
            nodes.append(step)
        else:
            return Mismatch(anchor, f"{std.name} is not divided into {d.name}", kind)
        inverse = step.outputs[0]
        step = single_reader(inverse)
        if not (is_op(step, "Mul") and _other(step, inverse) is d):
            return Mismatch(anchor, f"{inverse.name} does not multiply {d.name}", kind)
        nodes.append(step)
    return _affine(anchor, kind, x, d, epsilon, nodes)


def _affine(anchor, kind, x, d, epsilon, nodes) -> Decomposed | Mismatch:
    """Take the optional no-op Cast, ``* scale`` and (LayerNorm) ``+ bias`` after the normalization."""
    output = nodes[-1].outputs[0]
    step = single_reader(output)
    if is_op(step, "Cast") and x.dtype is not None and step.attributes.get_int("to") == x.dtype.value:
        nodes.append(step)
        output = step.outputs[0]
        step = single_reader(output)
    scale = scale_value = bias = None
    form = "plain"
    if is_op(step, "Mul"):
        scale_value = _other(step, output)
        scale = constant(scale_value)
        if scale is not None:
            producer = scale_value.producer()
            form = "gemma (1 + weight)" if is_op(producer, "Add") else "affine"
            nodes.append(step)
            output = step.outputs[0]
            step = single_reader(output)
        else:
            scale_value = None
    if kind == "layer" and is_op(step, "Add"):
        bias = constant(_other(step, output))
        if bias is not None:
            nodes.append(step)
            output = step.outputs[0]
    problem = _internal_readers(nodes, output, x, d)
    if problem:
        return Mismatch(anchor, problem, kind)
    size = last_dim(x)
    scale, problem = _vector(scale, size, 1.0, "scale")
    if problem:
        return Mismatch(anchor, problem, kind)
    if bias is not None:
        bias, problem = _vector(bias, scale.size, 0.0, "bias")
        if problem:
            return Mismatch(anchor, problem, kind)
    dtype = x.dtype.numpy() if x.dtype is not None else np.float32
    return Decomposed(
        kind,
        x,
        output,
        float(epsilon),
        scale.astype(dtype),
        None if bias is None else bias.astype(dtype),
        nodes,
        scale_value,
        form,
    )


def _vector(array, size, fill, what) -> tuple[np.ndarray | None, str | None]:
    """``array`` as a 1-D vector over the normalized axis; ones/zeros when absent."""
    if array is None or array.size == 1:
        if size is None:
            return None, f"the hidden size is not static, so the {what} cannot be built"
        value = fill if array is None else float(array.reshape(()))
        return np.full(size, value, dtype=np.float32 if array is None else array.dtype), None
    if any(dim != 1 for dim in array.shape[:-1]):
        return None, f"the {what} (shape {list(array.shape)}) is not a vector over the last axis"
    if size is not None and array.shape[-1] != size:
        return None, f"the {what} has {array.shape[-1]} entries, the hidden size is {size}"
    return array.reshape(-1), None


def _internal_readers(nodes: list[ir.Node], output: ir.Value, x: ir.Value, d: ir.Value) -> str | None:
    """Every value computed inside the norm must be read only inside it."""
    inside = set(nodes)
    for node in nodes:
        for value in node.outputs:
            if value is output or value is x:
                continue
            if value.is_graph_output():
                return f"intermediate {value.name} is a graph output"
            for reader in value.consumers():
                if reader not in inside:
                    return f"intermediate {value.name} is also read by {describe(reader)}"
    return None


def find(graph: ir.Graph) -> tuple[list[Decomposed], list[Mismatch]]:
    """Every decomposed norm in ``graph`` and every mean-of-squares that is not one."""
    found, missed = [], []
    for node in list(graph):
        result = match(node)
        if isinstance(result, Decomposed):
            found.append(result)
        elif isinstance(result, Mismatch):
            missed.append(result)
    return found, missed
