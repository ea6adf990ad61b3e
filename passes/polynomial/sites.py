"""Where the graph is not polynomial: every site the pass must rewrite, and the value to calibrate.

A non-linearity whose input is plaintext is a site too (``encrypted`` False): the rules record
why they leave it, so the report lists every non-linearity the pass looked at.
"""

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
    encrypted: bool = True  # False: the value is plaintext, nothing to approximate

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
    """Every non-linearity in graph order; those on plaintext marked ``encrypted=False``."""
    sites = []
    for node in graph:
        if not node.inputs or node.inputs[0] is None:
            continue
        site = _site(node, encrypted)
        if site is not None:
            sites.append(site)
    return sites


def _site(node: ir.Node, encrypted: set[ir.Value]) -> Site | None:
    site = _candidate(node, encrypted)
    if site is None or site.encrypted or not _integer(site.value):
        return site
    return None  # shape arithmetic, not a non-linearity


def _integer(value: ir.Value) -> bool:
    return value.dtype is not None and not value.dtype.is_floating_point()


def _candidate(node: ir.Node, encrypted: set[ir.Value]) -> Site | None:
    x, op = node.inputs[0], node.op_type
    if op in ELEMENTWISE_OPS:
        return Site(node, "elementwise", x, encrypted=x in encrypted)
    if op == "Softmax":
        return Site(node, "softmax", x, encrypted=x in encrypted)
    if op == "LayerNormalization":
        return Site(node, "layernorm", x, encrypted=x in encrypted)
    if op == "Reciprocal":
        return _inverse(node, x, None) if x in encrypted else Site(node, "reciprocal", x, encrypted=False)
    if op == "Div" and len(node.inputs) > 1 and node.inputs[1] is not None:
        if node.inputs[1] in encrypted:
            return _inverse(node, node.inputs[1], x)
        return Site(node, "reciprocal", node.inputs[1], x, encrypted=False)
    if op == "Sqrt" and not _only_inverted(node):
        return Site(node, "sqrt", x, encrypted=x in encrypted)
    return None


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
