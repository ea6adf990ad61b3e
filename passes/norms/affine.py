"""fold-norm-affine: a norm read only by linear layers gives its scale and shift to their weights.

``(n * g + b) @ W + c  ==  n @ (diag(g) W) + (b @ W + c)``, so the norm keeps no affine
parameters (the computational-invariance step behind SliceGPT). One rule, ``fold-<norm op>``
in the counts; a norm with any other reader keeps its affine, and its site record says which
reader stopped it.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx_ir as ir

from txcompile.graph.shapes import infer_shapes
from txcompile.passes.norms.common import constant, is_norm, node_site, set_constant_input
from txcompile.passes.norms.linear import LinearReader, fold_into_readers, linear_readers
from txcompile.passes.rules import Rewrite, Rule, RulePass

# where gamma and beta sit in each norm op's inputs
AFFINE_INPUTS = {
    "LayerNormalization": (1, 2),
    "RMSNormalization": (1, None),
    "SimplifiedLayerNormalization": (1, None),
    "SkipLayerNormalization": (2, 3),
    "SkipSimplifiedLayerNormalization": (2, None),
}


@dataclasses.dataclass
class AffineSite:
    """A norm node, its scale (and shift) as arrays, and the linear layers that read it."""

    node: ir.Node
    gamma: np.ndarray | None = None
    beta: np.ndarray | None = None
    readers: list[LinearReader] = dataclasses.field(default_factory=list)
    problem: str | None = None


def read_affine(site: AffineSite) -> str | None:
    """Fill ``site`` from the graph as it is now; the reason its affine cannot be folded, or None."""
    node = site.node
    gamma_at, beta_at = AFFINE_INPUTS[node.op_type]
    site.gamma = gamma = constant(node.inputs[gamma_at])
    if beta_at is not None and len(node.inputs) > beta_at and node.inputs[beta_at] is not None:
        site.beta = constant(node.inputs[beta_at])
        if site.beta is None:
            site.problem = "its shift is not a constant"
            return site.problem
    beta = site.beta
    if gamma is None:
        site.problem = "its scale is not a constant"
    elif gamma.ndim != 1 or (beta is not None and beta.shape != gamma.shape):
        site.problem = "its scale / shift are not vectors over the hidden axis"
    elif np.all(gamma == 1) and (beta is None or not np.any(beta)):
        site.problem = "it has no affine parameters left to fold"
    else:
        site.readers, site.problem = linear_readers(node.outputs[0])
        if site.problem is None and any(r.weight.shape[0] != gamma.size for r in site.readers):
            site.problem = "a reader's weight does not match the hidden size"
    return site.problem


class FoldAffine(Rule):
    """Norm(x, g, b) read only by linear layers → Norm(x, 1) and the readers take diag(g) W, b W."""

    name = "fold-norm-affine"

    def match(self, model, state):
        return [AffineSite(node) for node in model.graph if is_norm(node)]

    def site_name(self, site: AffineSite):
        return node_site(site.node)

    def check(self, site: AffineSite, state):
        return read_affine(site)  # read now: an earlier fold may have changed a shared reader

    def rewrite(self, model, site: AffineSite, state):
        graph, node = model.graph, site.node
        gamma_at, beta_at = AFFINE_INPUTS[node.op_type]
        fold_into_readers(graph, site.readers, site.gamma, site.beta)
        ones = np.ones_like(site.gamma)
        set_constant_input(node, gamma_at, ones, graph, hint=f"{node.name or 'norm'}.ones")
        if site.beta is not None:
            node.replace_input_with(beta_at, None)
            if beta_at == len(node.inputs) - 1:
                node.resize_inputs(beta_at)
        return Rewrite(node.op_type, rule=f"fold-{node.op_type}")  # edits weights, creates no node


class FoldNormAffine(RulePass):
    name = "fold-norm-affine"
    summary = "fold a norm's scale and shift into the linear layers that read it (SliceGPT's first step)"
    rules = (FoldAffine,)

    def prepare(self, model: ir.Model) -> None:
        infer_shapes(model)

    def finish(self, model, state, records) -> None:
        """Nothing to sweep: the norm stays and only constants were replaced."""
