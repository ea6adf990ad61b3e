"""Node-level facts every layer reads: who made a node (metadata keys), op names, traversal."""

from __future__ import annotations

import collections

import onnx_ir as ir

RULE_KEY = "txcompile.rule"
PASS_KEY = "txcompile.pass"
MS_DOMAIN = "com.microsoft"  # ONNX Runtime's contrib ops


def all_nodes(model: ir.Model) -> list[ir.Node]:
    """Every node, subgraphs and functions included."""
    nodes = list(ir.traversal.RecursiveGraphIterator(model.graph))
    for function in model.functions.values():
        nodes.extend(ir.traversal.RecursiveGraphIterator(function))
    return nodes


def shape_axes(start: int | None, end: int | None, rank: int) -> range:
    """The axes a Shape node with these start/end attributes returns, of a rank-``rank`` input
    (negatives count from the end, both clamped to [0, rank], as ONNX defines them)."""
    bounds = [0 if start is None else start, rank if end is None else end]
    low, high = (min(max(b + rank if b < 0 else b, 0), rank) for b in bounds)
    return range(low, high)


def op_key(node: ir.Node) -> str:
    """``MatMul`` for the default domain, ``com.microsoft.Attention`` otherwise."""
    return node.op_type if node.domain in ("", "ai.onnx") else f"{node.domain}.{node.op_type}"


def op_histogram(model: ir.Model) -> dict[str, int]:
    counts = collections.Counter(op_key(n) for n in ir.traversal.RecursiveGraphIterator(model.graph))
    return dict(sorted(counts.items()))
