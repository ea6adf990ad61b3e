"""fuse-norms: decomposed LayerNorm / RMSNorm → one norm op; with the residual Add → a Skip norm.

Rules (each site's rule lands in the node metadata and the report):

* ``layer-norm``: a decomposed LayerNorm (see norm_match) → ``LayerNormalization`` (opset 17).
* ``rms-norm``: a decomposed RMSNorm (LLaMA, T5, Gemma's ``1 + w``) → ``RMSNormalization``
  (opset 23). ORT's ``SimplifiedLayerNormalization`` sits in the default ONNX domain, which
  the ONNX checker rejects, so the standard op is used and the opset raised when that is safe.
* ``skip-layer-norm`` / ``skip-rms-norm``: a norm whose input is ``Add(stream, branch)`` →
  ``com.microsoft.SkipLayerNormalization`` / ``SkipSimplifiedLayerNormalization`` (CPU and
  CUDA kernels, fp32 and fp16); the sum stays available as the op's 4th output, and a
  constant bias added to the branch just before is taken in as the op's bias.

Norms left alone are listed in ``details["left"]`` with the reason.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import onnx_ir.passes.common as common

from txcompile.graph.shapes import infer_shapes
from txcompile.passes.base import TxPass
from txcompile.passes.norms import match as norm_match
from txcompile.passes.norms.common import (
    constant,
    describe,
    is_op,
    new_initializer,
    opset_raise_problem,
    raise_opset,
    site_name,
)

LAYER_NORM_OPSET = 17
RMS_NORM_OPSET = 23
SKIP_OF = {
    "LayerNormalization": ("SkipLayerNormalization", "skip-layer-norm"),
    "RMSNormalization": ("SkipSimplifiedLayerNormalization", "skip-rms-norm"),
    "SimplifiedLayerNormalization": ("SkipSimplifiedLayerNormalization", "skip-rms-norm"),
}


class FuseNorms(TxPass):
    name = "fuse-norms"
    summary = (
        "decomposed LayerNorm/RMSNorm → one op; residual Add + norm → Skip(Simplified)LayerNormalization"
    )

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        self.details = {"fused": [], "left": [], "no_skip": []}
        infer_shapes(model)
        modified = drop_noop_casts(model, self)
        modified |= fuse_decomposed(model, self)
        modified |= fuse_skip(model, self)
        if modified:
            common.RemoveUnusedNodesPass()(model)
        return ir.passes.PassResult(model, modified)


def drop_noop_casts(model: ir.Model, tx_pass: TxPass) -> bool:
    """Cast to the type a value already has (TorchScript writes them around every RMSNorm)."""
    dropped = 0
    for node in list(model.graph):
        if not is_op(node, "Cast") or node.inputs[0] is None or node.inputs[0].dtype is None:
            continue
        if node.attributes.get_int("to") != node.inputs[0].dtype.value or node.outputs[0].is_graph_output():
            continue
        ir.convenience.replace_all_uses_with(node.outputs[0], node.inputs[0])
        model.graph.remove(node, safe=True)
        dropped += 1
    if dropped:
        tx_pass.rule_counts["no-op-cast"] += dropped
    return bool(dropped)


def fuse_decomposed(model: ir.Model, tx_pass: TxPass, kinds=("layer", "rms")) -> bool:
    """Replace each decomposed norm of the given kinds by its ONNX op; record the rest."""
    graph = model.graph
    found, missed = norm_match.find(graph)
    for miss in missed:
        tx_pass.details["left"].append({"site": _anchor_name(miss.anchor), "reason": miss.reason})
    modified = False
    for site in found:
        if site.kind not in kinds:
            continue
        name = site_name(site.scale_value, site.nodes, site.output)
        needed = LAYER_NORM_OPSET if site.kind == "layer" else RMS_NORM_OPSET
        problem = opset_raise_problem(model, needed)
        if problem and not (site.kind == "rms" and skip_problem(site.x) is None):
            tx_pass.details["left"].append({"site": name, "reason": f"needs opset {needed}: {problem}"})
            continue
        note = None if problem else raise_opset(model, needed)
        if note:
            tx_pass.details["opset"] = note
        node = _norm_node(graph, site, name)
        node.name = unique_node_name(graph, node.name)
        copy_type(site.output, node.outputs[0])
        graph.insert_before(site.nodes[-1], node)
        ir.convenience.replace_all_uses_with(site.output, node.outputs[0], replace_graph_outputs=True)
        graph.remove(site.nodes, safe=True)
        rule = "layer-norm" if site.kind == "layer" else "rms-norm"
        tx_pass.tag([node], rule)
        tx_pass.rule_counts[rule] += 1
        tx_pass.details["fused"].append({"site": name, "rule": rule, "op": node.op_type, "form": site.form})
        modified = True
    return modified


def _norm_node(graph: ir.Graph, site: norm_match.Decomposed, name: str) -> ir.Node:
    scale = new_initializer(graph, f"{name}.scale" if site.scale_value is None else name, site.scale)
    attributes = {"axis": -1, "epsilon": site.epsilon, "stash_type": 1}
    if site.kind == "layer":
        inputs = [site.x, scale]
        if site.bias is not None:
            inputs.append(new_initializer(graph, f"{name}.bias", site.bias))
        return ir.node("LayerNormalization", inputs, attributes, name=f"{name}/LayerNormalization")
    return ir.node("RMSNormalization", [site.x, scale], attributes, name=f"{name}/RMSNormalization")


def copy_type(source: ir.Value, target: ir.Value) -> None:
    target.shape, target.type = source.shape, source.type


def unique_node_name(graph: ir.Graph, wanted: str) -> str:
    taken = {node.name for node in graph}
    name, index = wanted, 1
    while name in taken:
        name, index = f"{wanted}_{index}", index + 1
    return name


def _anchor_name(anchor: ir.Node) -> str:
    return anchor.name or anchor.outputs[0].name


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
    if _main_and_skip(add) is None:
        return f"{describe(add)} broadcasts in a way SkipLayerNormalization does not take"
    return None


def _main_and_skip(add: ir.Node) -> tuple[ir.Value, ir.Value] | None:
    """(input, skip): input has the sum's shape; skip has it too or is [1, S, D]."""
    a, b = add.inputs
    out = add.outputs[0].shape
    for main, skip in ((a, b), (b, a)):
        if main.shape != out:
            continue
        if skip.shape == out or (skip.shape[0] == 1 and list(skip.shape)[1:] == list(out)[1:]):
            return main, skip
    return None


def _branch_bias(main: ir.Value) -> tuple[ir.Value, np.ndarray | None]:
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


def fuse_skip(model: ir.Model, tx_pass: TxPass) -> bool:
    """Norm(Add(input, skip)) → Skip norm, whose 4th output replaces the Add for its other readers."""
    graph = model.graph
    modified = False
    for norm in list(graph):
        if norm.op_type not in SKIP_OF or norm.domain not in ("", "ai.onnx"):
            continue
        site = norm.name or norm.outputs[0].name
        problem = _norm_problem(norm) or skip_problem(norm.inputs[0])
        if problem:
            tx_pass.details["no_skip"].append({"site": site, "reason": problem})
            continue
        op_type, rule = SKIP_OF[norm.op_type]
        add = norm.inputs[0].producer()
        main, skip = _main_and_skip(add)
        main, bias = _branch_bias(main)
        inputs = [main, skip, _as_initializer(graph, norm.inputs[1], f"{site}.gamma")]
        if op_type == "SkipLayerNormalization":
            beta = norm.inputs[2] if len(norm.inputs) > 2 else None
            inputs.append(_as_initializer(graph, beta, f"{site}.beta") if beta is not None else None)
        if bias is not None:
            inputs.append(new_initializer(graph, f"{site}.bias", bias))
        epsilon = norm.attributes.get_float("epsilon", 1e-5)
        fused = ir.node(
            op_type,
            inputs,
            {"epsilon": epsilon},
            domain="com.microsoft",
            num_outputs=4,
            name=unique_node_name(graph, f"{site}/{op_type}"),
        )
        copy_type(norm.outputs[0], fused.outputs[0])
        copy_type(add.outputs[0], fused.outputs[3])
        graph.insert_after(add, fused)
        ir.convenience.replace_all_uses_with(norm.outputs[0], fused.outputs[0], replace_graph_outputs=True)
        ir.convenience.replace_all_uses_with(add.outputs[0], fused.outputs[3], replace_graph_outputs=True)
        graph.remove(norm, safe=True)
        graph.remove(add, safe=True)  # a branch bias Add it read is now dead: RemoveUnusedNodes drops it
        tx_pass.tag([fused], rule)
        tx_pass.rule_counts[rule] += 1
        tx_pass.details["fused"].append({"site": site, "rule": rule, "op": op_type, "bias": bias is not None})
        modified = True
    if "com.microsoft" not in model.opset_imports and modified:
        model.opset_imports["com.microsoft"] = 1
    return modified


def _norm_problem(norm: ir.Node) -> str | None:
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
