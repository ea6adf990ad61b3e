"""Structured sparsity: channels that vanish are cut out of both layers around them.

A channel region is what lies between one or more *source* linears (e.g. an FFN's up
projection, or LLaMA's gate and up) and the *sink* linear that reads their result (the down
projection), when everything in between is per-channel elementwise (bias Add, Gelu, Erf, Mul,
SiLU...). Channel j is dead when the sink's input row j is zero (nothing it computes is used),
or when every source's column j is zero (then it carries a constant, folded into a bias after
the sink). Dead channels are sliced out of the sources' columns, the region's per-channel
constants and the sink's rows: exact, and both GEMMs shrink.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx
import onnx_ir as ir

from txcompile.graph import ort as rt
from txcompile.graph.nodes import MS_DOMAIN

from .linears import Linear

ELEMENTWISE = {
    ("", op)
    for op in (
        "Add", "Sub", "Mul", "Div", "Pow", "Relu", "Gelu", "Erf", "Tanh", "Sigmoid", "Neg", "Abs",
        "Exp", "Sqrt", "Softplus", "HardSigmoid", "HardSwish", "LeakyRelu", "Elu", "Selu", "Identity",
    )
}  # fmt: skip
ELEMENTWISE |= {(MS_DOMAIN, op) for op in ("Gelu", "FastGelu", "BiasGelu", "QuickGelu")}


SHARED = "has another consumer outside the layer pair"  # a pair that would be a region but for this


@dataclasses.dataclass
class ChannelRegion:
    sources: list[Linear]
    nodes: list[ir.Node]  # in graph order
    sink: Linear

    @property
    def channels(self) -> int:
        return self.sink.shape[0]


def find_regions(graph: ir.Graph, linears: list[Linear]) -> tuple[list[ChannelRegion], dict[str, str]]:
    """Every channel region, and for sinks without one the reason."""
    by_node = {id(lin.node): lin for lin in linears if lin.node.op_type == "MatMul"}
    regions, reasons = [], {}
    for sink in linears:
        if sink.node.op_type != "MatMul":
            continue
        region, reason = _region(sink, by_node)
        if region is None:
            reasons[sink.name] = reason
        else:
            regions.append(region)
    return regions, reasons


def _region(sink: Linear, by_node: dict[int, Linear]) -> tuple[ChannelRegion | None, str]:
    channels = sink.shape[0]
    start = sink.node.inputs[0]
    sources: dict[int, Linear] = {}
    nodes: dict[int, ir.Node] = {}
    frontier, seen = [start], set()
    while frontier:
        value = frontier.pop()
        if id(value) in seen:
            continue
        seen.add(id(value))
        producer = value.producer()
        if producer is None:
            return None, "input comes from outside any layer (graph input)"
        source = by_node.get(id(producer))
        if source is not None:
            if source.shape[1] != channels:
                return None, f"source {source.name} has {source.shape[1]} columns, sink reads {channels}"
            sources[id(producer)] = source
            continue
        if (producer.domain, producer.op_type) not in ELEMENTWISE or len(producer.outputs) != 1:
            return None, f"{producer.op_type} between the layers is not per-channel elementwise"
        for operand in producer.inputs:
            if operand is None:
                continue
            if operand.const_value is not None:
                if not _per_channel(operand, channels):
                    return None, f"{producer.op_type} constant {operand.name} is not per-channel"
            else:
                frontier.append(operand)
        nodes[id(producer)] = producer
    if not sources:
        return None, "no linear layer feeds it through elementwise ops"
    inside = set(nodes) | {id(sink.node)}
    for node in [*nodes.values(), *(s.node for s in sources.values())]:
        out = node.outputs[0]
        if out.is_graph_output() or any(id(use.node) not in inside for use in out.uses()):
            return None, f"{out.name} {SHARED}"
    graph = sink.node.graph
    ordered = [node for node in graph if id(node) in nodes]
    ordered_sources = [sources[id(node)] for node in graph if id(node) in sources]
    return ChannelRegion(ordered_sources, ordered, sink), ""


def _per_channel(value: ir.Value, channels: int) -> bool:
    dims = tuple(int(d) for d in value.const_value.shape)
    return all(d == 1 for d in dims[:-1]) and (not dims or dims[-1] in (1, channels))


def dead_channels(region: ChannelRegion) -> tuple[np.ndarray, np.ndarray]:
    """(unused: sink row is zero, constant: every source column is zero and the sink row is not)."""
    unused = ~region.sink.matrix().any(axis=1)
    silent = np.ones(region.channels, dtype=bool)
    for source in region.sources:
        silent &= ~source.matrix().any(axis=0)
    return unused, silent & ~unused


def aligned(dead: np.ndarray, multiple: int = 32) -> np.ndarray:
    """Drop fewer channels so the kept count stays a multiple of 32 (or 16, 8) when the layer's was:
    the sources then still split into column groups. Keeping a dead channel is always exact."""
    channels = len(dead)
    multiple = next((m for m in (multiple, 16, 8) if channels % m == 0), 1)
    kept = int((~dead).sum())
    target = min(channels, -(-kept // multiple) * multiple)
    dead = dead.copy()
    dead[np.flatnonzero(dead)[: target - kept]] = False
    return dead


def whole_groups(dead: np.ndarray, width: int = 32) -> np.ndarray:
    """Only channels whose whole aligned group of ``width`` is dead (all of them, if it does not divide)."""
    if len(dead) % width:
        return np.zeros_like(dead)
    return np.repeat(dead.reshape(-1, width).all(axis=1), width)


def region_at_zero(region: ChannelRegion, opsets: dict[str, int]) -> np.ndarray:
    """What the region hands the sink when every source outputs zeros: [channels]."""
    if not region.nodes:
        return np.zeros(region.channels, dtype=np.float64)
    inputs = [
        onnx.helper.make_tensor_value_info(
            s.node.outputs[0].name, onnx.TensorProto.FLOAT, [1, region.channels]
        )
        for s in region.sources
    ]
    out_name = region.sink.node.inputs[0].name
    constants = {
        v.name: ir.serde.serialize_tensor(v.const_value)
        for node in region.nodes
        for v in node.inputs
        if v is not None and v.const_value is not None
    }
    for name, tensor in constants.items():
        tensor.name = name
    graph = onnx.helper.make_graph(
        [ir.serde.serialize_node(n) for n in region.nodes],
        "region",
        inputs,
        [onnx.helper.make_tensor_value_info(out_name, onnx.TensorProto.FLOAT, None)],
        list(constants.values()),
    )
    opset_imports = [onnx.helper.make_opsetid(domain, version) for domain, version in opsets.items()]
    proto = onnx.helper.make_model(graph, opset_imports=opset_imports)
    proto.ir_version = 9
    session = rt.create_session(proto, optimize=False)
    zeros = {i.name: np.zeros((1, region.channels), np.float32) for i in inputs}
    return np.asarray(session.run(None, zeros)[0], dtype=np.float64).reshape(-1)


def shrink(graph: ir.Graph, region: ChannelRegion, keep: np.ndarray, prefix: str) -> list[ir.Node]:
    """Keep only channels ``keep`` (bool [channels]) in the sources, the region and the sink.

    Every changed constant becomes a new initializer (the old one may be shared). Returns the
    nodes whose inputs changed, for tagging."""
    index = np.flatnonzero(keep)
    kept = len(index)
    touched = []

    def replace(node: ir.Node, slot: int, array: np.ndarray, name: str) -> None:
        old = node.inputs[slot]
        value = ir.Value(name=fresh_name(graph, name), const_value=ir.tensor(np.ascontiguousarray(array)))
        value.shape, value.type = ir.Shape(array.shape), ir.TensorType(old.const_value.dtype)
        graph.register_initializer(value)
        node.replace_input_with(slot, value)
        if old.is_initializer() and not list(old.uses()) and not old.is_graph_output():
            graph.initializers.pop(old.name, None)

    for source in region.sources:
        weight = source.weight.const_value.numpy()
        replace(source.node, 1, weight[:, index], f"{prefix}_{source.name}_cols")
        touched.append(source.node)
    for node in region.nodes:
        for slot, operand in enumerate(node.inputs):
            if operand is None or operand.const_value is None:
                continue
            array = operand.const_value.numpy()
            if array.ndim and array.shape[-1] == region.channels and region.channels != 1:
                replace(node, slot, array[..., index], f"{prefix}_{operand.name}_kept")
                touched.append(node)
    weight = region.sink.weight.const_value.numpy()
    replace(region.sink.node, 1, weight[index, :], f"{prefix}_{region.sink.name}_rows")
    touched.append(region.sink.node)
    for node in [*(s.node for s in region.sources), *region.nodes]:
        out = node.outputs[0]
        if out.shape is not None and len(out.shape) > 0:
            out.shape = ir.Shape([*list(out.shape)[:-1], kept])
    return touched


def add_after(graph: ir.Graph, node: ir.Node, delta: np.ndarray, name: str) -> ir.Node:
    """y = node(...) + delta: folded into an existing constant bias Add, else a new Add."""
    out = node.outputs[0]
    uses = list(out.uses())
    if len(uses) == 1 and uses[0].node.op_type == "Add" and not out.is_graph_output():
        add = uses[0].node
        other = add.inputs[1 - uses[0].idx]
        if other is not None and other.const_value is not None and other.const_value.shape == delta.shape:
            bias = other.const_value.numpy()
            value = ir.Value(
                name=fresh_name(graph, name), const_value=ir.tensor((bias + delta).astype(bias.dtype))
            )
            value.shape, value.type = ir.Shape(delta.shape), ir.TensorType(other.const_value.dtype)
            graph.register_initializer(value)
            add.replace_input_with(1 - uses[0].idx, value)
            return add
    constant = ir.Value(name=fresh_name(graph, name), const_value=ir.tensor(delta.astype(np.float32)))
    constant.shape, constant.type = ir.Shape(delta.shape), ir.TensorType(ir.DataType.FLOAT)
    graph.register_initializer(constant)
    new = ir.Node("", "Add", [out, constant], num_outputs=1)
    new.outputs[0].shape, new.outputs[0].type = out.shape, out.type
    was_output, out_name = out.is_graph_output(), out.name
    ir.convenience.replace_all_uses_with(out, new.outputs[0], replace_graph_outputs=True)
    new.replace_input_with(0, out)
    graph.insert_after(node, new)
    if was_output:
        out.name = f"{out_name}_before_{name}"
        new.outputs[0].name = out_name
    return new


def fresh_name(graph: ir.Graph, name: str) -> str:
    taken = set(graph.initializers)
    candidate, n = name, 0
    while candidate in taken:
        n += 1
        candidate = f"{name}_{n}"
    return candidate
