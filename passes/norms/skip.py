"""Norm(Add(stream, branch)) → ORT's Skip norm: ``skip-layer-norm`` and ``skip-rms-norm``.

``com.microsoft.SkipLayerNormalization`` / ``SkipSimplifiedLayerNormalization`` have CPU and
CUDA kernels (fp32 and fp16). The sum stays available as the op's 4th output, so the residual
stream goes on; a constant bias added to the branch just before is taken in as the op's bias.

On the CPU, LayerNorms stay Add + LayerNormalization: onnxruntime's CPU SkipLayerNormalization
kernel is the slower form there (onnxruntime 1.32, 2 threads, per norm: 16 against 7 µs at
13 tokens × 384, 1031 against 197 µs at 8 × 128 × 384, 2051 against 576 µs at 8 × 128 × 768;
all-MiniLM-L6-v2 runs 5–9 % faster in fp32 and 12–19 % in int8 without it), so txcompile's CPU
sessions also keep onnxruntime from fusing the pair itself (``graph.ort.create_session``).
SkipSimplifiedLayerNormalization is as fast as Add + RMSNorm at one token and stays.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from txcompile.graph.nodes import MS_DOMAIN
from txcompile.passes.norms.common import (
    constant,
    copy_type,
    describe,
    is_op,
    new_initializer,
    node_site,
    unique_node_name,
)
from txcompile.passes.rules import Rewrite, Rule

SLOWER_ON_CPU = (
    "kept as Add + LayerNormalization: on the CPU onnxruntime's SkipLayerNormalization kernel is "
    "2-5x slower than the pair"
)


def skip_problem(x: ir.Value) -> str | None:
    """Why the norm reading ``x`` cannot become a Skip norm (None when it can)."""
    add = x.producer()
    if not is_op(add, "Add"):
        return "its input is not a residual Add"
    a, b = add.inputs
    if constant(a) is not None or constant(b) is not None:
        return f"{describe(add)} adds a constant, not a residual branch"
    shapes = [v.shape for v in (a, b, x)]
    if any(s is None or len(s) != 3 for s in shapes):
        return f"{describe(add)} does not add two known rank-3 tensors"
    if any(not isinstance(d, int) and d.value is None for s in shapes for d in s):
        return f"{describe(add)} has dimensions shape inference could not name"
    if main_and_skip(add) is None:
        return f"{describe(add)} broadcasts in a way SkipLayerNormalization does not take"
    return None


def main_and_skip(add: ir.Node) -> tuple[ir.Value, ir.Value] | None:
    """(input, skip): input has the sum's shape; skip has it too or is [1, S, D]."""
    a, b = add.inputs
    out = add.outputs[0].shape
    for main, skip in ((a, b), (b, a)):
        if main.shape != out:
            continue
        if skip.shape == out or (skip.shape[0] == 1 and list(skip.shape)[1:] == list(out)[1:]):
            return main, skip
    return None


def branch_bias(main: ir.Value) -> tuple[ir.Value, np.ndarray | None]:
    """A constant [D] bias added to the branch just before the residual Add, taken into the Skip op."""
    add = main.producer()
    if not is_op(add, "Add") or len(main.consumers()) != 1 or main.is_graph_output():
        return main, None
    for value, other in ((add.inputs[0], add.inputs[1]), (add.inputs[1], add.inputs[0])):
        bias = constant(other)
        size = main.shape[-1] if main.shape is not None else None
        if (
            bias is not None
            and constant(value) is None
            and bias.shape == (size,)
            and value.shape == main.shape
        ):
            return value, bias
    return main, None


def norm_problem(norm: ir.Node) -> str | None:
    """Why this norm op's attributes or parameters do not fit a Skip norm."""
    if norm.attributes.get_int("axis", -1) not in (-1, 2):
        return "it normalizes over more than the last axis"
    if norm.attributes.get_int("stash_type", 1) != 1:
        return "its stash_type is not float"
    if any(out.consumers() or out.is_graph_output() for out in norm.outputs[1:]):
        return "its mean / inverse std-dev outputs are read"
    scale = constant(norm.inputs[1])
    if scale is None or scale.ndim != 1:
        return "its scale is not a constant vector"
    if len(norm.inputs) > 2 and norm.inputs[2] is not None:
        beta = constant(norm.inputs[2])
        if beta is None or beta.ndim != 1:
            return "its bias is not a constant vector"
    return None


def _as_initializer(graph: ir.Graph, value: ir.Value, hint: str) -> ir.Value:
    """Skip ops are placed where the Add was; constants made by later Constant nodes move to initializers."""
    if value.is_initializer():
        return value
    return new_initializer(graph, hint, constant(value))


class SkipNorm(Rule):
    """``norm_ops`` reading a residual Add → ``op_type``, whose 4th output replaces the Add."""

    norm_ops: tuple[str, ...]
    op_type: str
    has_beta: bool

    def match(self, model, state):
        return [node for node in model.graph if is_op(node, *self.norm_ops)]

    def site_name(self, site):
        return node_site(site)

    def check(self, site, state):
        return norm_problem(site) or skip_problem(site.inputs[0])

    def rewrite(self, model, norm, state):
        graph, site = model.graph, node_site(norm)
        add = norm.inputs[0].producer()
        main, skip = main_and_skip(add)
        main, bias = branch_bias(main)
        inputs = [main, skip, _as_initializer(graph, norm.inputs[1], f"{site}.gamma")]
        if self.has_beta:
            beta = norm.inputs[2] if len(norm.inputs) > 2 else None
            inputs.append(_as_initializer(graph, beta, f"{site}.beta") if beta is not None else None)
        if bias is not None:
            inputs.append(new_initializer(graph, f"{site}.bias", bias))
        epsilon = norm.attributes.get_float("epsilon", 1e-5)
        name = unique_node_name(graph, f"{site}/{self.op_type}")
        fused = ir.node(
            self.op_type, inputs, {"epsilon": epsilon}, domain=MS_DOMAIN, num_outputs=4, name=name
        )
        copy_type(norm.outputs[0], fused.outputs[0])
        copy_type(add.outputs[0], fused.outputs[3])
        graph.insert_after(add, fused)
        ir.convenience.replace_all_uses_with(norm.outputs[0], fused.outputs[0], replace_graph_outputs=True)
        ir.convenience.replace_all_uses_with(add.outputs[0], fused.outputs[3], replace_graph_outputs=True)
        graph.remove(norm, safe=True)
        graph.remove(add, safe=True)  # a branch bias Add it read is now dead: RemoveUnusedNodes drops it
        model.opset_imports.setdefault(MS_DOMAIN, 1)
        return Rewrite(self.op_type, [fused], {"bias": bias is not None})


class SkipLayerNorm(SkipNorm):
    """LayerNormalization(Add(a, b), g, beta) → SkipLayerNormalization(a, b, g, beta[, bias]),
    on CUDA; on the CPU the pair is faster as it is."""

    name, norm_ops, op_type, has_beta = (
        "skip-layer-norm",
        ("LayerNormalization",),
        "SkipLayerNormalization",
        True,
    )

    def check(self, site, state):
        problem = super().check(site, state)
        if problem is None and state.device == "cpu":
            return SLOWER_ON_CPU
        return problem


class SkipRmsNorm(SkipNorm):
    """RMSNormalization(Add(a, b), g) → SkipSimplifiedLayerNormalization(a, b, g[, bias])."""

    name = "skip-rms-norm"
    norm_ops = ("RMSNormalization", "SimplifiedLayerNormalization")
    op_type, has_beta = "SkipSimplifiedLayerNormalization", False
