"""Graph helpers the norm passes share: op tests, constants, readers, new initializers, names.

Initializers may be shared by several nodes (CSE merges equal constants), so a pass that
changes a weight never edits it in place: it gives the node a new initializer instead.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from txcompile.graph.build import GraphBuilder
from txcompile.graph.constants import constant_array
from txcompile.graph.nodes import MS_DOMAIN

NORM_OPS = {
    ("", "LayerNormalization"),
    ("", "RMSNormalization"),
    ("", "SimplifiedLayerNormalization"),
    (MS_DOMAIN, "SkipLayerNormalization"),
    (MS_DOMAIN, "SkipSimplifiedLayerNormalization"),
}


def is_op(node: ir.Node | None, *op_types: str, domain: str = "") -> bool:
    domains = ("", "ai.onnx") if domain == "" else (domain,)
    return node is not None and node.op_type in op_types and node.domain in domains


def is_norm(node: ir.Node) -> bool:
    """One of the norm ops (default domain spelled either way, or ORT's Skip norms)."""
    domain = "" if node.domain == "ai.onnx" else node.domain or ""
    return (domain, node.op_type) in NORM_OPS


def constant(value: ir.Value | None) -> np.ndarray | None:
    """The value as an array when it is an initializer, a Constant, or Add/Sub of two such (Gemma's 1 + w)."""
    array = constant_array(value)
    if array is not None or value is None:
        return array
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


def single_reader(value: ir.Value) -> ir.Node | None:
    """The one node that reads ``value`` (None when several do or it is a graph output)."""
    readers = value.consumers()
    return readers[0] if len(readers) == 1 and not value.is_graph_output() else None


def describe(node: ir.Node) -> str:
    return f"{node.op_type} {node.name}" if node.name else node.op_type


def node_site(node: ir.Node) -> str:
    return node.name or node.outputs[0].name


def new_initializer(graph: ir.Graph, hint: str, array: np.ndarray) -> ir.Value:
    """Register ``array`` under a fresh, deterministic name derived from ``hint``."""
    return GraphBuilder(graph, hint or "txc").const(np.ascontiguousarray(array))


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


def copy_type(source: ir.Value, target: ir.Value) -> None:
    target.shape, target.type = source.shape, source.type


def unique_node_name(graph: ir.Graph, wanted: str) -> str:
    taken = {node.name for node in graph}
    name, index = wanted, 1
    while name in taken:
        name, index = f"{wanted}_{index}", index + 1
    return name


def site_name(scale: ir.Value | None, nodes: list[ir.Node], fallback: ir.Value) -> str:
    """A readable name for a norm: its weight's module path, else its first node's name."""
    if scale is not None and scale.name and scale.is_initializer() and len(scale.consumers()) == 1:
        return scale.name.removesuffix(".weight")
    for node in nodes:
        if node.name:
            return node.name.rsplit("/", 1)[0] if "/" in node.name else node.name
    return fallback.name or "?"
