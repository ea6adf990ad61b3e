"""LayerNormalization as centering + a Newton inverse square root (``layernorm-newton-isqrt``).

The variance is pre-scaled into the inverse's domain, the centering copies fold into the
producing layer where they can (no level), and γ·d' joins the last Newton step.
"""

from __future__ import annotations

import math

import numpy as np
import onnx_ir as ir

from txcompile.graph.build import GraphBuilder
from txcompile.graph.constants import constant_array, is_constant
from txcompile.graph.errors import TxError

from . import calibrate, composite
from .approx import LevelArith, NumpyArith
from .emit import OnnxArith
from .inverse import plan_inverse
from .site_rule import SiteRule
from .sites import Site
from .state import PolyState, inverse_record, max_error


def const_or_fail(node: ir.Node, index: int) -> np.ndarray:
    value = node.inputs[index]
    if not is_constant(value):
        raise TxError(f"{node.op_type} {node.name!r}: input {index} must be a constant")
    return constant_array(value).astype(np.float64)


def layernorm_exact(a: np.ndarray, gamma: np.ndarray, eps: float) -> np.ndarray:
    return (a - a.mean(-1, keepdims=True)) / np.sqrt(a.var(-1, keepdims=True) + eps) * gamma


def centering_copies(state: PolyState, b: GraphBuilder, x: ir.Value, root: float, n: int) -> tuple | None:
    """(√s·x, √s·mean x) at x's level, both folded into x's producer, or None."""
    scaled = state.scale(b, x, root)
    if scaled is None:
        return None
    mean, level = state.row_mean(b, x, root / n)
    return (scaled, mean) if level == 0 else None


class LayerNormRule(SiteRule):
    name = "layernorm-newton-isqrt"
    kinds = ("layernorm",)

    def kind(self, site: Site) -> str:
        return "LayerNorm"

    def contract(self, site: Site, state: PolyState) -> None:
        node = site.node
        axis = node.attributes["axis"].value if "axis" in node.attributes else -1
        rank = state.calib[site.value.name][0].ndim
        if axis % rank != rank - 1:
            raise TxError(f"LayerNormalization {node.name!r}: only the last axis is supported")
        const_or_fail(node, 1)
        if self._has_beta(node):
            const_or_fail(node, 2)

    @staticmethod
    def _has_beta(node: ir.Node) -> bool:
        return len(node.inputs) > 2 and node.inputs[2] is not None

    def emit(self, site: Site, state: PolyState, b: GraphBuilder) -> tuple[ir.Value, dict]:
        node, x = site.node, site.value
        eps = node.attributes["epsilon"].value if "epsilon" in node.attributes else 1e-5
        calib, held = state.calib[x.name], state.heldout[x.name]
        n = calib[0].shape[-1]
        gamma = const_or_fail(node, 1)
        beta = const_or_fail(node, 2) if self._has_beta(node) else None
        totals = np.concatenate([(n * a.var(-1)).ravel() for a in calib])
        sums = calibrate.positive_domain(totals, state.margin)
        s = 2.0 / (sums.high - sums.low)
        low = s * sums.low + s * n * eps
        isqrt = plan_inverse("layernorm-isqrt", 0.5, low, low + 2.0, state.tol, factor=True)
        g = b.const(gamma * math.sqrt(n), np.float32)
        bt = b.const(beta, np.float32) if beta is not None else None
        root = math.sqrt(s)
        copies = centering_copies(state, b, x, root, n)
        out = composite.layernorm(OnnxArith(b), x, n, s, eps, isqrt, g, bt, -1, copies)
        at_x = (0, 0) if copies else None
        depth = composite.layernorm(LevelArith(), 0, n, s, eps, isqrt, 0, None, -1, at_x)
        error = 0.0
        for a in [*calib, *held]:
            scaled = (a * root, a.sum(-1, keepdims=True) * (root / n)) if copies else None
            approx = composite.layernorm(
                NumpyArith(), a, n, s, eps, isqrt, gamma * math.sqrt(n), None, -1, scaled
            )
            error = max(error, max_error(layernorm_exact(a, gamma, eps), approx))
        held_totals = np.concatenate([(n * a.var(-1)).ravel() for a in held])
        return out, {
            "degree": isqrt.degree,
            "depth": depth,
            "isqrt": inverse_record(isqrt),
            "centering_levels": 0 if copies else 1,
            "max_error": error,
            "domain": [sums.low, sums.high],
            "observed": [float(totals.min()), float(totals.max())],
            "out_of_range": calibrate.out_of_range_rate([held_totals], sums.low, sums.high),
        }
