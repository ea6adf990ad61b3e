"""The plan of remove-padding: which values are packed, which nodes run on real tokens only,
and which readers need the padded layout back."""

from __future__ import annotations

import onnx_ir as ir

from txcompile.graph.nodes import op_key
from txcompile.passes.attention.padding_layout import ATTENTION, NORMS, USABLE, TokenLayout, data_inputs


class PaddingPlan:
    """Which values get a packed form, which nodes read it, and who needs the padded layout back."""

    def __init__(self, layout: TokenLayout, verdicts: dict[ir.Node, str], packed_kernels: bool):
        self.layout, self.verdicts, self.packed_kernels = layout, verdicts, packed_kernels
        self.layouts: dict[ir.Value, tuple[tuple[int, ...], bool]] = {}  # packed values → (tail, flat)
        self.seeds: set[ir.Value] = set()  # packed by a gather right after their producer
        self.region: list[ir.Node] = []  # nodes that read packed values
        self.packed_attention: set[ir.Node] = set()  # become PackedAttention / PackedMultiHeadAttention
        self.restored_attention: set[ir.Node] = set()  # run on the restored layout
        self.boundary_users: set[ir.Node] = set()

    def walk(self, graph: ir.Graph, seeds: set[ir.Value]) -> None:
        for value in graph.inputs:
            if value in seeds:
                self._seed(value)
        for node in graph:
            self._visit(node)
            for output in node.outputs:
                if output in seeds and output not in self.layouts:
                    self._seed(output)

    def _seed(self, value: ir.Value) -> None:
        self.seeds.add(value)
        self.layouts[value] = self.layout.layout(value)

    def _visit(self, node: ir.Node) -> None:
        owner, key = self.layout, op_key(node)
        verdict = self.verdicts.get(node)
        data = [node.inputs[i] for i in ATTENTION[key][0]] if verdict else data_inputs(node)
        if any(v in self.layouts for v in data):  # the rest per token too? gather them as well
            missing = [v for v in data if v not in self.layouts and owner.layout(v) is not None]
            if missing and (verdict in USABLE or owner.token_wise(node, {*self.layouts, *missing})):
                for value in missing:
                    self._seed(value)
        if verdict in USABLE and all(v in self.layouts for v in data):
            self.region.append(node)
            if verdict == "pure" and self.packed_kernels:
                self.packed_attention.add(node)
                self.layouts[node.outputs[0]] = owner.layout(node.outputs[0])
            else:  # runs on the restored layout; its output is packed again
                self.restored_attention.add(node)
                self._seed(node.outputs[0])
        elif owner.token_wise(node, self.layouts):
            self.region.append(node)
            kept = NORMS[key][0] if key in NORMS else range(len(node.outputs))
            for i in kept:
                if i < len(node.outputs) and (node.outputs[i].uses() or node.outputs[i].is_graph_output()):
                    self.layouts[node.outputs[i]] = owner.layout(node.outputs[i])
        elif any(v in self.layouts for v in node.inputs if v is not None):
            self.boundary_users.add(node)
