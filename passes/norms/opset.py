"""Raising the default-domain opset for a new norm op, only where no op in the graph changes meaning."""

from __future__ import annotations

import onnx_ir as ir

LAYER_NORM_OPSET = 17
RMS_NORM_OPSET = 23
# ops whose meaning changed between the versions a norm pass may raise the opset across
_VERSION_SENSITIVE = {"GroupNormalization", "RoiAlign"}


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
