"""preln-to-rmsnorm: a Pre-LN transformer's LayerNorms become RMSNorms, exactly.

In a Pre-LN graph every LayerNorm reads the residual stream, and the stream is a sum of
writes: embeddings (token, position, patch conv, class token) and the output projections of
attention and MLP. Centering each writer's weights and bias over the hidden axis makes the
stream zero-mean for every token, so ``LayerNorm(h) == RMSNorm(h) * g + b`` ("Pre-RMSNorm and
Pre-CRMSNorm Transformers", Jiang et al. 2023).

Rules, in order: ``layer-norm`` (decomposed LayerNorms first, decomposed.py), then from one
plan of the whole graph (preln_plan.py): ``center-writer`` (a writer's weight, bias or table
centered), ``center-explicitly`` (a write no weight can absorb — Whisper's conv → Gelu stem, an
embedding norm as in Swin — gets ``x - mean(x)`` where it joins the stream) and
``layer-norm-to-rms-norm`` (the LayerNorm's shift ``b`` goes into the linear layers that read it
when all of them are linear, else into an ``Add`` after it). A refused graph changes nothing
beyond the decomposed fusions; ``details["refused"]`` says why.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import onnx_ir.passes.common as common

from txcompile.graph.shapes import infer_shapes
from txcompile.passes.norms.common import (
    constant,
    new_initializer,
    node_site,
    set_constant_input,
    unique_node_name,
)
from txcompile.passes.norms.decomposed import LayerNorm
from txcompile.passes.norms.linear import fold_into_readers, linear_readers
from txcompile.passes.norms.opset import (
    RMS_NORM_OPSET,
    convert_opset,
    needs_conversion,
    opset_raise_problem,
    raise_opset,
)
from txcompile.passes.norms.preln_plan import Conversion, plan_conversion
from txcompile.passes.norms.state import NormState
from txcompile.passes.norms.stream import Edit, Explicit
from txcompile.passes.rules import Rewrite, Rule, RulePass


class PrelnState(NormState):
    """The conversion is planned once, after the decomposed LayerNorms are fused."""

    _plan: Conversion | None = None

    def plan(self) -> Conversion:
        if self._plan is None:
            self._plan = plan_conversion(self.model)
            if self._plan.refused is None and needs_conversion(self.model, RMS_NORM_OPSET):
                note = convert_opset(self.model, RMS_NORM_OPSET)
                if note:  # the graph was replaced: plan it again
                    infer_shapes(self.model)
                    self._plan = plan_conversion(self.model)
                    self.note_opset(note)
                else:
                    self._plan.refused = opset_raise_problem(self.model, RMS_NORM_OPSET)
        return self._plan

    def centering(self):
        plan = self.plan()
        return plan.centering if plan.refused is None else None


class CenterWriter(Rule):
    """A writer into the stream: its weight, bias or embedding table minus its mean over the hidden axis."""

    name = "center-writer"

    def match(self, model, state: PrelnState):
        centering = state.centering()
        return list(centering.edits) if centering else []

    def site_name(self, site: Edit):
        return site.node.name or site.node.op_type

    def rewrite(self, model, site: Edit, state):
        set_constant_input(site.node, site.index, site.array, model.graph)
        return Rewrite(site.node.op_type, extra={"input": site.index, "what": site.what})


class CenterExplicitly(Rule):
    """A write nothing can absorb: ``x - ReduceMean(x)`` on the edge where it joins the stream."""

    name = "center-explicitly"

    def match(self, model, state: PrelnState):
        centering = state.centering()
        return list(centering.explicit) if centering else []

    def site_name(self, site: Explicit):
        return site.node.name or site.node.op_type

    def rewrite(self, model, site: Explicit, state):
        graph, node = model.graph, site.node
        value = node.inputs[site.index]
        axes = new_initializer(graph, f"{value.name}.axes", np.array([site.axis], dtype=np.int64))
        mean = ir.node("ReduceMean", [value, axes], {"keepdims": 1}, name=f"{node.name}/center_mean")
        centered = ir.node("Sub", [value, mean.outputs[0]], name=f"{node.name}/center")
        centered.outputs[0].shape, centered.outputs[0].type = value.shape, value.type
        graph.insert_before(node, [mean, centered])
        node.replace_input_with(site.index, centered.outputs[0])
        what = f"explicit x - mean(x): {site.why}"
        return Rewrite("ReduceMean + Sub", extra={"input": site.index, "what": what})  # untagged, as before


class LayerNormToRmsNorm(Rule):
    """LayerNorm(h, g, b) on a centered stream → RMSNorm(h, g) + b (b into linear readers if it can)."""

    name = "layer-norm-to-rms-norm"

    def match(self, model, state: PrelnState):
        return list(state.plan().norms)

    def site_name(self, site: ir.Node):
        return node_site(site)

    def check(self, site, state: PrelnState):
        plan = state.plan()
        return plan.refused or plan.left.get(site)

    def rewrite(self, model, norm, state: PrelnState):
        state.note_opset(raise_opset(model, RMS_NORM_OPSET))
        graph = model.graph
        x, gamma = norm.inputs[0], norm.inputs[1]
        beta = constant(norm.inputs[2]) if len(norm.inputs) > 2 and norm.inputs[2] is not None else None
        epsilon = norm.attributes.get_float("epsilon", 1e-5)
        attributes = {"axis": -1, "epsilon": epsilon, "stash_type": 1}
        name = unique_node_name(graph, f"{norm.name or 'norm'}/rms")
        rms = ir.node("RMSNormalization", [x, gamma], attributes, name=name)
        out = norm.outputs[0]
        rms.outputs[0].shape, rms.outputs[0].type = out.shape, out.type
        graph.insert_before(norm, rms)
        result, shift = rms.outputs[0], "none"
        if beta is not None and np.any(beta):
            readers, problem = linear_readers(out)
            if problem is None:
                ir.convenience.replace_all_uses_with(out, result, replace_graph_outputs=True)
                fold_into_readers(graph, readers, None, beta)
                shift = f"folded into {len(readers)} linear readers"
            else:
                add = ir.node(
                    "Add", [result, norm.inputs[2]], name=unique_node_name(graph, f"{rms.name}/shift")
                )
                add.outputs[0].shape, add.outputs[0].type = out.shape, out.type
                graph.insert_after(rms, add)
                result, shift = add.outputs[0], f"kept as an Add ({problem})"
        ir.convenience.replace_all_uses_with(out, result, replace_graph_outputs=True)
        graph.remove(norm, safe=True)
        return Rewrite("RMSNormalization", [rms], {"epsilon": epsilon, "shift": shift})


class PreLnToRmsNorm(RulePass):
    name = "preln-to-rmsnorm"
    summary = "Pre-LN: center every write into the residual stream, then LayerNorm → RMSNorm (exact)"
    rules = (LayerNorm, CenterWriter, CenterExplicitly, LayerNormToRmsNorm)

    def prepare(self, model: ir.Model) -> PrelnState:
        infer_shapes(model)
        return PrelnState(model)

    def finish(self, model, state: PrelnState, records) -> None:
        self.details.update(state.notes)
        self.details["refused"] = state.plan().refused
        if self.details["refused"] is None:
            self.rule_counts.setdefault("center-writer", 0)  # reported even when no writer needed it
            common.RemoveUnusedNodesPass()(model)
