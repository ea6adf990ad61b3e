"""Decomposed norms → one op: ``no-op-cast``, ``layer-norm`` and ``rms-norm``.

* ``no-op-cast``: a Cast to the type a value already has (TorchScript writes them around every
  RMSNorm) goes first, so the norm chains below read straight through.
* ``layer-norm``: a decomposed LayerNorm (see match.py) → ``LayerNormalization`` (opset 17).
* ``rms-norm``: a decomposed RMSNorm (LLaMA, T5, Gemma's ``1 + w``) → ``RMSNormalization``
  (opset 23). ORT's ``SimplifiedLayerNormalization`` sits in the default ONNX domain, which
  the ONNX checker rejects, so the standard op is used and the opset raised when that is safe;
  where it is not, an RMSNorm that a Skip norm will absorb is fused anyway.
"""

from __future__ import annotations

import onnx_ir as ir

from txcompile.passes.norms import match as norm_match
from txcompile.passes.norms.common import copy_type, is_op, new_initializer, site_name, unique_node_name
from txcompile.passes.norms.opset import (
    LAYER_NORM_OPSET,
    RMS_NORM_OPSET,
    opset_raise_problem,
    raise_opset,
)
from txcompile.passes.norms.skip import skip_problem
from txcompile.passes.norms.state import NormState
from txcompile.passes.rules import Rewrite, Rule


class NoOpCast(Rule):
    """Cast(x, to=dtype(x)) → x."""

    name = "no-op-cast"

    def match(self, model, state):
        for node in list(model.graph):
            source = node.inputs[0] if is_op(node, "Cast") else None
            if (
                source is not None
                and source.dtype is not None
                and node.attributes.get_int("to") == source.dtype.value
            ):
                yield node

    def site_name(self, site):
        return site.name or site.outputs[0].name

    def check(self, site, state):
        return "its output is a graph output" if site.outputs[0].is_graph_output() else None

    def rewrite(self, model, site, state):
        ir.convenience.replace_all_uses_with(site.outputs[0], site.inputs[0])
        model.graph.remove(site, safe=True)
        return Rewrite("(removed)")


class DecomposedNorm(Rule):
    """The decomposed norms of one ``kind`` → its ONNX op; a near miss says why it is not one."""

    kind: str
    op_type: str
    opset: int

    def match(self, model, state: NormState):
        found, missed = state.decomposed()
        yield from (miss for miss in missed if miss.kind == self.kind)
        yield from (site for site in found if site.kind == self.kind)

    def site_name(self, site):
        if isinstance(site, norm_match.Mismatch):
            return site.anchor.name or site.anchor.outputs[0].name
        return site_name(site.scale_value, site.nodes, site.output)

    def check(self, site, state: NormState):
        if isinstance(site, norm_match.Mismatch):
            return site.reason
        problem = opset_raise_problem(state.model, self.opset)
        if problem and not self.fuse_anyway(site):
            return f"needs opset {self.opset}: {problem}"
        return None

    def fuse_anyway(self, site: norm_match.Decomposed) -> bool:
        """Whether to emit the op although the opset cannot be raised to the op's."""
        return False

    def rewrite(self, model, site: norm_match.Decomposed, state: NormState):
        graph, name = model.graph, self.site_name(site)
        if opset_raise_problem(model, self.opset) is None:
            state.note_opset(raise_opset(model, self.opset))
        node = self.norm_node(graph, site, name)
        node.name = unique_node_name(graph, node.name)
        copy_type(site.output, node.outputs[0])
        graph.insert_before(site.nodes[-1], node)
        ir.convenience.replace_all_uses_with(site.output, node.outputs[0], replace_graph_outputs=True)
        graph.remove(site.nodes, safe=True)
        return Rewrite(self.op_type, [node], {"form": site.form})

    def norm_node(self, graph: ir.Graph, site: norm_match.Decomposed, name: str) -> ir.Node:
        scale = new_initializer(graph, f"{name}.scale" if site.scale_value is None else name, site.scale)
        inputs = [site.x, scale]
        if site.bias is not None:
            inputs.append(new_initializer(graph, f"{name}.bias", site.bias))
        attributes = {"axis": -1, "epsilon": site.epsilon, "stash_type": 1}
        return ir.node(self.op_type, inputs, attributes, name=f"{name}/{self.op_type}")


class LayerNorm(DecomposedNorm):
    """mean / Sub / mean of squares / Sqrt / Div (or Reciprocal, Mul) [* w] [+ b] → LayerNormalization."""

    name, kind, op_type, opset = "layer-norm", "layer", "LayerNormalization", LAYER_NORM_OPSET


class RmsNorm(DecomposedNorm):
    """mean of squares / Sqrt / Reciprocal (or 1 / ...) / Mul [* w] → RMSNormalization."""

    name, kind, op_type, opset = "rms-norm", "rms", "RMSNormalization", RMS_NORM_OPSET

    def fuse_anyway(self, site):
        return skip_problem(site.x) is None  # fuse-norms turns it into a Skip norm (com.microsoft)
