"""Graph helpers the norm passes share: constants, readers, new initializers, opset raises.

Initializers may be shared by several nodes (CSE merges equal constants), so a pass that
changes a weight never edits it in place: it gives the node a new initializer instead.
"""

from __future__ import annotations

import itertools

import numpy as np
import onnx_ir as ir

NORM_OPS = {
    ("", "LayerNormalization"),
    ("", "RMSNormalization"),
    ("", "SimplifiedLayerNormalization"),
    ("com.microsoft", "SkipLayerNormalization"),
    ("com.microsoft", "SkipSimplifiedLayerNormalization"),
}
# ops whose meaning changed between the versions a norm pass may raise the opset across
_VERSION_SENSITIVE = {"GroupNormalization", "RoiAlign"}


def is_op(node: ir.Node | None, *op_types: str, domain: str = "") -> bool:
    domains = ("", "ai.onnx") if domain == "" else (domain,)
    return node is not None and node.op_type in op_types and node.domain in domains


def constant(value: ir.Value | None) -> np.ndarray | None:
    """The value as an array when it is an initializer, a Constant, or Add/Sub of two such (Gemma's 1 + w)."""
    if value is None:
        return None
    tensor = ir.convenience.get_const_tensor(value)
    if tensor is not None:
        return tensor.numpy()
    node = value.producer()
    if is_op(node, "Add", "Sub") and len(node.inputs) == 2:
        a, b = constant(node.inputs[0]), constant(node.inputs[1])
        if a is not None and b is not None:
            return a + b if node.op_type == "Add" else a - b
    return None


def scalar(value: ir.Value | None) -> float | None:
    array = constant(value)
    if array is None or array.size != 1:
        return None
    return float(array.reshape(()))


def readers(value: ir.Value) -> list[ir.Node]:
    return list(value.consumers())


def only_read_by(value: ir.Value, allowed: set[ir.Node] | list[ir.Node]) -> ir.Node | None:
    """The first node outside ``allowed`` that reads ``value``, or None when there is none."""
    allowed = set(allowed)
    for node in value.consumers():
        if node not in allowed:
            return node
    return None


def describe(node: ir.Node) -> str:
    return f"{node.op_type} {node.name}" if node.name else node.op_type


def other_reader_reason(value: ir.Value, allowed) -> str | None:
    """Why ``value`` cannot disappear: another node reads it, or it is a graph output."""
    if value.is_graph_output():
        return f"{value.name} is a graph output"
    other = only_read_by(value, allowed)
    if other is not None:
        return f"{value.name} is also read by {describe(other)}"
    return None


_counter = itertools.count()


def new_initializer(graph: ir.Graph, hint: str, array: np.ndarray) -> ir.Value:
    """Register ``array`` under a fresh name derived from ``hint``."""
    taken = set(graph.initializers)
    base = f"{hint}.txc" if hint else "txc"
    name = base
    while name in taken:
        name = f"{base}{next(_counter)}"
    value = ir.Value(name=name, const_value=ir.tensor(np.ascontiguousarray(array), name=name))
    value.shape = ir.Shape(array.shape)
    value.dtype = ir.DataType.from_numpy(array.dtype)
    graph.register_initializer(value)
    return value


def set_constant_input(node: ir.Node, index: int, array: np.ndarray, graph: ir.Graph, hint: str = "") -> None:
    """Point ``node``'s input ``index`` at a new initializer holding ``array`` (copy on write)."""
    old = node.inputs[index]
    name = hint or (old.name if old is not None and old.name else node.name or node.op_type)
    node.replace_input_with(index, new_initializer(graph, name, array))


def last_dim(value: ir.Value) -> int | None:
    shape = value.shape
    if shape is None or len(shape) == 0:
        return None
    dim = shape[-1]
    return dim if isinstance(dim, int) else None


def rank(value: ir.Value) -> int | None:
    return None if value.shape is None else len(value.shape)


def reduces_last_axis(node: ir.Node) -> bool:
    """ReduceMean over exactly the last axis, keeping it (axes as attribute or as input)."""
    if not is_op(node, "ReduceMean"):
        return False
    if node.attributes.get_int("keepdims", 1) != 1:
        return False
    axes = node.attributes.get_ints("axes", None)
    if axes is None and len(node.inputs) > 1 and node.inputs[1] is not None:
        array = constant(node.inputs[1])
        axes = None if array is None else [int(a) for a in array.reshape(-1)]
    if axes is None or len(axes) != 1:
        return False
    x_rank = rank(node.inputs[0])
    return axes[0] == -1 or (x_rank is not None and axes[0] == x_rank - 1)


def opset_raise_problem(model: ir.Model, needed: int) -> str | None:
    """Why the default-domain opset cannot be raised to ``needed`` without changing meaning, or None."""
    current = model.opset_imports.get("", 1)
    if current >= needed:
        return None
    if current < 18 <= needed:
        return f"opset {current} uses ReduceX axes attributes that opset 18 moved to inputs"
    for node in ir.traversal.RecursiveGraphIterator(model.graph):
        if node.domain in ("", "ai.onnx") and node.op_type in _VERSION_SENSITIVE:
            return f"{node.op_type} changed meaning after opset {current}"
    return None


def raise_opset(model: ir.Model, needed: int) -> str | None:
    """Raise the default-domain opset to ``needed``; returns a note for the report when it did."""
    current = model.opset_imports.get("", 1)
    if current >= needed:
        return None
    model.opset_imports[""] = needed
    model.graph.opset_imports[""] = needed
    return f"raised the ONNX opset from {current} to {needed}"


def site_name(scale: ir.Value | None, nodes: list[ir.Node], fallback: ir.Value) -> str:
    """A readable name for a norm: its weight's module path, else its first node's name."""
    if scale is not None and scale.name and scale.is_initializer() and len(scale.consumers()) == 1:
        return scale.name.removesuffix(".weight")
    for node in nodes:
        if node.name:
            return node.name.rsplit("/", 1)[0] if "/" in node.name else node.name
    return fallback.name or "?"
