"""How tensors enter and leave a fused attention op: head merges in, the fused output out.

The fused ops read Q (and K/V) as [B, S, hidden]; when the graph has only the head-split
[B, N, S, D] form, a Transpose+Reshape merges the heads (``query-merge-heads``). Their output
replaces the graph's own merged-heads tensor after P·V, so the unfused chain dies whole.
"""

from __future__ import annotations

import collections

import numpy as np
import onnx_ir as ir

from txcompile.graph.build import GraphBuilder
from txcompile.graph.probe import Shapes
from txcompile.passes.attention.read import Layout, Reading, perm


def bsh(value: ir.Value, hidden: int, b: GraphBuilder) -> ir.Value:
    """[B, N, S, D] → [B, S, N·D]."""
    transposed = b.op("Transpose", value, perm=[0, 2, 1, 3])
    return b.op("Reshape", transposed, b.const(np.array([0, 0, hidden], np.int64)))


class QueryMergeHeads:
    """Q as [B, S, hidden] for MultiHeadAttention: the graph's own tensor, else merged here."""

    name = "query-merge-heads"

    def check(self, reading: Reading) -> str | None:
        """Why no merge is needed (None: Q exists only head-split, so the rule merges it)."""
        return "Q is already [B, S, hidden] in the graph" if reading.query_bsh is not None else None

    def apply(self, reading: Reading, b: GraphBuilder, counts: collections.Counter) -> ir.Value:
        if self.check(reading) is not None:
            return reading.query_bsh
        counts[self.name] += 1
        return bsh(reading.site.query, reading.layout.hidden, b)


def query_bsh(reading: Reading, b: GraphBuilder, counts: collections.Counter) -> ir.Value:
    return QueryMergeHeads().apply(reading, b, counts)


def attach_output(reading: Reading, output: ir.Value, shapes: Shapes, b: GraphBuilder, merged: bool):
    """Replace the merged-heads [B, S, hidden] tensor after P·V, or P·V itself when there is none.

    ``Shape`` readers of the split tensors (TorchScript computes the merge's target shape from
    them) are rebuilt from the fused output, so they do not keep the unfused chain alive.
    """
    site, layout = reading.site, reading.layout
    product = site.pv.outputs[0]
    target = _merged_target(product, layout, shapes) if merged else None
    if target is not None:
        transposed = _non_shape_users(product)[0].outputs[0]
        heads = b.const(np.array([layout.heads], np.int64))
        size = b.const(np.array([layout.head_dim], np.int64))
        batch = b.op("Shape", output, start=0, end=1)
        seq = b.op("Shape", output, start=1, end=2)
        _replace_shapes(product, b, [batch, heads, seq, size])
        _replace_shapes(transposed, b, [batch, seq, heads, size])
    else:
        target = product
        if merged:
            shape = b.const(np.array([0, 0, layout.heads, layout.head_dim], np.int64))
            output = b.op("Transpose", b.op("Reshape", output, shape), perm=[0, 2, 1, 3])
    target.replace_all_uses_with(output, replace_graph_outputs=True)


def _merged_target(product: ir.Value, layout: Layout, shapes: Shapes) -> ir.Value | None:
    """Reshape(Transpose(0, 2, 1, 3)(P·V)) → [B, S, hidden], when the graph merges the heads."""
    if product.is_graph_output():
        return None
    users = _non_shape_users(product)
    if len(users) != 1 or perm(users[0]) != (0, 2, 1, 3):
        return None
    transposed = users[0].outputs[0]
    after = _non_shape_users(transposed)
    if len(after) != 1 or after[0].op_type != "Reshape" or transposed.is_graph_output():
        return None
    candidate = after[0].outputs[0]
    return candidate if shapes(candidate) == (layout.batch, layout.seq, layout.hidden) else None


def _non_shape_users(value: ir.Value) -> list[ir.Node]:
    return [user for user, _ in value.uses() if not _whole_shape(user)]


def _whole_shape(node: ir.Node) -> bool:
    return node.op_type == "Shape" and "start" not in node.attributes and "end" not in node.attributes


def _replace_shapes(value: ir.Value, b: GraphBuilder, parts: list[ir.Value]) -> None:
    readers = [user for user, _ in value.uses() if _whole_shape(user)]
    if readers:
        rebuilt = b.op("Concat", *parts, axis=0)
        for reader in readers:
            reader.outputs[0].replace_all_uses_with(rebuilt, replace_graph_outputs=True)
