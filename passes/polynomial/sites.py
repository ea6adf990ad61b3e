"""Where the graph is not polynomial: every site the pass must rewrite, and the value to calibrate."""

from __future__ import annotations

import dataclasses

import onnx_ir as ir

ELEMENTWISE_OPS = {"Gelu", "Erf", "Tanh", "Sigmoid", "Exp"}


@dataclasses.dataclass
class Site:
    """``kind``: elementwise, softmax, layernorm, invsqrt, reciprocal, sqrt."""

    node: ir.Node
    kind: str
    value: ir.Value  # the value whose range is calibrated
    numerator: ir.Value | None = None  # Div(a, ·): the result is a · f(value)
    consumed: tuple[ir.Node, ...] = ()  # nodes the rewrite makes dead besides ``node``

    def current_value(self) -> ir.Value:
        """The value now, after earlier rewrites may have replaced the one first found."""
        if self.kind == "invsqrt":
            return self.consumed[0].inputs[0]
        if self.node.op_type == "Div":
            return self.node.inputs[1]
        return self.node.inputs[0]

    def current_numerator(self) -> ir.Value | None:
        return self.node.inputs[0] if self.numerator is not None else None


def find_sites(graph: ir.Graph, encrypted: set[ir.Value]) -> list[Site]:
    sites = []
    for node in graph:
        if not node.inputs or node.inputs[0] is None:
            continue
        x = node.inputs[0]
        op = node.op_type
        if op in ELEMENTWISE_OPS and x in encrypted:
            sites.append(Site(node, "elementwise", x))
        elif op == "Softmax" and x in encrypted:
            sites.append(Site(node, "softmax", x))
        elif op == "LayerNormalization" and x in encrypted:
            sites.append(Site(node, "layernorm", x))
        elif op == "Reciprocal" and x in encrypted:
            sites.append(_inverse(node, x, None))
        elif op == "Div" and node.inputs[1] in encrypted:
            sites.append(_inverse(node, node.inputs[1], x))
        elif op == "Sqrt" and x in encrypted and not _only_inverted(node):
            sites.append(Site(node, "sqrt", x))
    return sites


def _inverse(node: ir.Node, denominator: ir.Value, numerator: ir.Value | None) -> Site:
    root = denominator.producer()
    if root is not None and root.op_type == "Sqrt" and _only_inverted(root):
        return Site(node, "invsqrt", root.inputs[0], numerator, (root,))
    return Site(node, "reciprocal", denominator, numerator)


def _only_inverted(sqrt: ir.Node) -> bool:
    """A Sqrt only ever divided by becomes an inverse square root at its users."""
    uses = sqrt.outputs[0].uses()
    if not uses or sqrt.outputs[0].is_graph_output():
        return False
    return all((u.node.op_type == "Reciprocal") or (u.node.op_type == "Div" and u.idx == 1) for u in uses)
