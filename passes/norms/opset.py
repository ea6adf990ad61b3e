"""Raising the default-domain opset for a new norm op, only where no op in the graph changes meaning."""

from __future__ import annotations

import contextlib
import logging

import onnx_ir as ir
from onnxscript.version_converter import ConvertVersionPass

LAYER_NORM_OPSET = 17
RMS_NORM_OPSET = 23
# ops whose meaning changed between the versions a norm pass may raise the opset across
_VERSION_SENSITIVE = {"GroupNormalization", "RoiAlign"}


def opset_raise_problem(model: ir.Model, needed: int) -> str | None:
    """Why the default-domain opset cannot be raised to ``needed`` without changing meaning, or None."""
    current = model.opset_imports.get("", 1)
    if current >= needed:
        return None
    problem = _sensitive_op(model, current)
    if problem is None and current < 18 <= needed:
        problem = (
            f"opset {current} uses ReduceX axes attributes that opset 18 moved to inputs, "
            "and onnx's version converter could not convert the graph"
        )
    return problem


def needs_conversion(model: ir.Model, needed: int) -> bool:
    """Whether reaching ``needed`` crosses opset 18, where ReduceX axes moved from attributes to inputs."""
    return model.opset_imports.get("", 1) < 18 <= needed


def convert_opset(model: ir.Model, needed: int) -> str | None:
    """Take a graph below opset 18 to ``needed`` with onnx's version converter; a note, or None.

    The converter rewrites every op whose form changed (ReduceX axes, Split, Pad, ...). It may
    replace ``model.graph``: call it before holding any node. The pass's own verification then
    checks the converted graph against the original, like any other rewrite.
    """
    current = model.opset_imports.get("", 1)
    if not needs_conversion(model, needed) or _sensitive_op(model, current):
        return None
    with _quiet("onnxscript.version_converter"):
        ConvertVersionPass(needed, fallback=True)(model)
    if model.opset_imports.get("", 1) != needed:
        return None
    return f"converted the graph from ONNX opset {current} to {needed} (onnx version converter)"


@contextlib.contextmanager
def _quiet(name: str):
    """The converter warns on every fallback to onnx's C API, and when that fails: the report says it."""
    logger = logging.getLogger(name)
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        logger.setLevel(level)


def _sensitive_op(model: ir.Model, current: int) -> str | None:
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
