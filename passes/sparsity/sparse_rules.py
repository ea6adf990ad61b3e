"""sparse-matmul's three rules, applied in this order:

- ``structured-channels``: channels that vanished between two layers are sliced out of both
  (structured.py), a constant they still carried folded into a bias after the sink;
- ``transposed-chain``: a layer pair whose every layer goes column-group, with only plain
  elementwise ops between, stays in the transposed [channels, M] layout (no transposes inside);
- ``column-groups`` (``column-groups-int8``): a block-sparse weight becomes a Gather plus one
  batched MatMul (column_groups.py), where the layer's decision (sparse_state.py) says it pays.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import onnx_ir as ir

from txcompile.graph.build import GraphBuilder
from txcompile.passes.rules import Rewrite, Rule

from . import column_groups, structured
from .blocks import zero_fraction
from .linears import Linear, find_linears
from .sparse_state import MIN_SPARSITY, SparseState


@dataclasses.dataclass
class SharedPair:
    """A layer pair that is no channel region because a value inside it is read elsewhere."""

    name: str
    reason: str


class StructuredChannelsRule(Rule):
    """Slice a channel region's dead channels out of its sources, its constants and its sink."""

    name = "structured-channels"

    def match(self, model: ir.Model, state: SparseState):
        regions, reasons = structured.find_regions(model.graph, find_linears(model.graph))
        shared = [SharedPair(sink, why) for sink, why in reasons.items() if why.endswith(structured.SHARED)]
        return [*regions, *shared]

    def site_name(self, region: structured.ChannelRegion | SharedPair) -> str:
        return region.name if isinstance(region, SharedPair) else region.sink.name

    def check(self, region: structured.ChannelRegion | SharedPair, state: SparseState) -> str | None:
        if isinstance(region, SharedPair):
            return region.reason
        dead, _ = dead_channels(region)
        if not dead.any():
            return "no dead channels"
        if dead.all():
            return "every channel is dead"
        return None

    def rewrite(self, model: ir.Model, region: structured.ChannelRegion, state: SparseState) -> Rewrite:
        graph = model.graph
        dead, silent = dead_channels(region)
        sink = region.sink.matrix()
        delta = None
        if silent.any():
            at_zero = structured.region_at_zero(region, state.opsets)
            delta = (at_zero[silent] @ sink[silent].astype(np.float64)).astype(np.float32)
        before = sum(s.shape[0] * s.shape[1] for s in region.sources) + sink.size
        touched = structured.shrink(graph, region, ~dead, "sparse")
        if delta is not None and np.any(delta != 0):
            touched.append(structured.add_after(graph, region.sink.node, delta, "sparse_dead_channels"))
        kept = int((~dead).sum())
        after = sum(s.shape[0] for s in region.sources) * kept + kept * sink.shape[1]
        pattern = f"structured: {region.channels} -> {kept} channels"
        state.layers.append(
            {
                "layer": region.sink.name,
                "sources": [s.name for s in region.sources],
                "pattern": pattern,
                "params_saved": int(before - after),
                "flops_saved_per_token": int(2 * (before - after)),
                "measured_speedup": None,
                "note": f"GEMM work shrinks in proportion; folded constant channels: {int(silent.sum())}",
            }
        )
        return Rewrite(region.sink.node.op_type, touched, {"pattern": pattern})


def dead_channels(region: structured.ChannelRegion) -> tuple[np.ndarray, np.ndarray]:
    """(channels to cut, those of them that carry a constant): whole column groups only where a
    source stays block-sparse beyond them, else a count that keeps the layer's alignment."""
    unused, silent = structured.dead_channels(region)
    dead = unused | silent
    if _block_sparse_sources(region, ~dead):
        # cutting single columns would scramble the sources' column groups: cut whole groups only
        dead = structured.whole_groups(dead)
    else:
        dead = structured.aligned(dead)
    return dead, silent & dead


def _block_sparse_sources(region: structured.ChannelRegion, keep: np.ndarray) -> bool:
    """Whether a source stays sparse enough, beyond the dead channels, for column groups."""
    for source in region.sources:
        matrix = source.matrix()
        kept = matrix if keep.all() else matrix[:, keep]  # no copy of a matrix that keeps all
        if kept.size and zero_fraction(kept) >= MIN_SPARSITY:
            return True
    return False


class TransposedChainRule(Rule):
    """Keep a whole column-group layer pair transposed: the sources skip their output transpose,
    the sink its input transpose, and the region's per-channel constants become columns."""

    name = "transposed-chain"

    def match(self, model: ir.Model, state: SparseState):
        linears = state.decide_all(model.graph)
        regions = structured.find_regions(model.graph, linears)[0]
        return [r for r in regions if any(id(lin.node) in state.plans for lin in _layers(r))]

    def site_name(self, region: structured.ChannelRegion) -> str:
        return region.sink.name

    def check(self, region: structured.ChannelRegion, state: SparseState) -> str | None:
        dense = [lin.name for lin in _layers(region) if id(lin.node) not in state.plans]
        if dense:
            return f"{', '.join(dense)} stays dense"
        chained = {id(lin.node) for lin in state.chained}
        taken = [lin.name for lin in _layers(region) if id(lin.node) in chained]
        if taken:
            return f"{', '.join(taken)} is already in a chain"
        gemm = [lin.name for lin in _layers(region) if lin.is_gemm]
        if gemm:
            return f"{', '.join(gemm)} is a Gemm"
        if len({id(s.node.inputs[0]) for s in region.sources}) != 1:
            return "the sources read different inputs"
        contrib = [node.op_type for node in region.nodes if node.domain not in ("", "ai.onnx")]
        if contrib:
            # contrib ops such as BiasGelu broadcast over the last axis and would not follow the transpose
            return f"{contrib[0]} between the layers is a contrib op"
        return None

    def rewrite(self, model: ir.Model, region: structured.ChannelRegion, state: SparseState) -> Rewrite:
        x = region.sources[0].node.inputs[0]
        rank = len(x.shape) if x.shape is not None else None
        for source in region.sources:
            state.layout[id(source.node)] = {"transposed_out": True}
            state.chained.append(source)
        state.layout[id(region.sink.node)] = {
            "transposed_in": True,
            "like": x,
            "rank": rank,
            "region": region,
        }
        state.chained.append(region.sink)
        chain = [s.name for s in region.sources]
        state.chains[id(region.sink.node)] = chain
        # the layers (and the region's constants) are rewritten, tagged and counted by ColumnGroupsRule
        return Rewrite("column groups, transposed", [], {"chain": chain})


def to_columns(graph: ir.Graph, region: structured.ChannelRegion) -> None:
    """The region's per-channel constants as [channels, 1] columns, for the transposed layout."""
    channels = region.channels
    for node in region.nodes:
        for slot, operand in enumerate(node.inputs):
            if operand is None or operand.const_value is None:
                continue
            array = operand.const_value.numpy()
            if array.ndim and array.shape[-1] == channels and channels != 1:
                column = ir.Value(
                    name=structured.fresh_name(graph, f"{operand.name}_column"),
                    const_value=ir.tensor(np.ascontiguousarray(array.reshape(channels, 1))),
                )
                column.shape, column.type = ir.Shape([channels, 1]), operand.type
                graph.register_initializer(column)
                node.replace_input_with(slot, column)
        for out in node.outputs:
            out.shape = None


def _layers(region: structured.ChannelRegion) -> list[Linear]:
    return [*region.sources, region.sink]


class ColumnGroupsRule(Rule):
    """Replace a block-sparse linear by the column-group Gather + batched MatMul (int8 optional)."""

    name = "column-groups"

    def match(self, model: ir.Model, state: SparseState):
        linears = state.decide_all(model.graph)
        chained = {id(lin.node) for lin in state.chained}
        return [*state.chained, *(lin for lin in linears if id(lin.node) not in chained)]

    def site_name(self, linear: Linear) -> str:
        return linear.name

    def check(self, linear: Linear, state: SparseState) -> str | None:
        if id(linear.node) in state.plans:
            return None
        return state.entries[id(linear.node)].get("reason", "stays dense")

    def rewrite(self, model: ir.Model, linear: Linear, state: SparseState) -> Rewrite:
        groups = state.plans[id(linear.node)]
        entry = state.entries[id(linear.node)]
        layout = dict(state.layout.get(id(linear.node), {}))
        if "region" in layout:  # the sink of a transposed chain
            to_columns(model.graph, layout.pop("region"))
        nodes, info = rewrite_layer(model.graph, linear, groups, state, **layout)
        k, n = groups.k, groups.n
        kept = groups.groups * groups.cols * groups.width
        entry.update(
            pattern=groups.describe() + (", int8" if state.int8 else ""),
            params_saved=int(k * n - kept),
            flops_saved_per_token=int(2 * (k * n - kept)),
            **info,
        )
        entry.pop("reason", None)
        if id(linear.node) in state.chains:
            entry["chain"] = state.chains[id(linear.node)]
        op = "MatMulInteger" if state.int8 else _product_op(nodes)
        label = "column-groups-int8" if state.int8 else None
        return Rewrite(op, nodes, {"pattern": entry["pattern"]}, rule=label)


def _product_op(nodes: list[ir.Node]) -> str:
    return next((n.op_type for n in nodes if n.op_type in ("FusedMatMul", "MatMul")), "MatMul")


def rewrite_layer(
    graph: ir.Graph, linear: Linear, groups, state: SparseState, **layout
) -> tuple[list[ir.Node], dict[str, Any]]:
    """Put the column-group form in place of ``linear``; (the nodes made, int8 error info)."""
    node = linear.node
    x = node.inputs[0]
    rank = layout.pop("rank") if "rank" in layout else (len(x.shape) if x.shape is not None else None)
    builder = GraphBuilder(graph, _unique_prefix(graph, f"sparse_{linear.name}"))
    out, info = column_groups.emit(builder, x, groups, rank, int8=state.int8, shared=state.shared, **layout)
    if linear.is_gemm and len(node.inputs) > 2 and node.inputs[2] is not None:
        out = builder.op("Add", out, node.inputs[2])
    made = builder.commit(node)
    old = node.outputs[0]
    out.type, out.shape = old.type, None if layout.get("transposed_out") else old.shape
    was_output, name = old.is_graph_output(), old.name
    ir.convenience.replace_all_uses_with(old, out, replace_graph_outputs=True)
    graph.remove(node, safe=True)
    if was_output:
        out.name = name
    if not list(linear.weight.uses()) and not linear.weight.is_graph_output():
        graph.initializers.pop(linear.weight.name, None)
    return made, info


def _unique_prefix(graph: ir.Graph, base: str) -> str:
    base = "".join(ch if ch.isalnum() or ch in "_." else "_" for ch in base)
    taken = set(graph.initializers)
    prefix, n = base, 0
    while any(name.startswith(prefix + "/") for name in taken):
        n += 1
        prefix = f"{base}{n}"
    return prefix
