"""GELU, erf, tanh, sigmoid and exp as one Chebyshev polynomial each, fitted on the calibrated range.

Parity is kept (a symmetric domain for odd/even parts: GELU = x/2 + an even part, sigmoid − ½
odd), and the pre-scaling to [−1, 1] folds into the producing linear layer where it can.
"""

from __future__ import annotations

import math

import onnx_ir as ir

from txcompile.graph.build import GraphBuilder

from .approx import fit_to_tolerance
from .emit import OnnxArith
from .fold import scaled_input
from .functions import ELEMENTWISE
from .site_rule import SiteRule
from .sites import Site
from .state import PolyState

MAX_DEGREE = 127  # wide activation domains (GELU on ±35 in MiniLM's first layer) need it for 1e-3


def function_key(node: ir.Node) -> str:
    """The ELEMENTWISE entry: the op, or ``Gelu:tanh`` for GELU's tanh form."""
    approximate = node.attributes.get("approximate")
    if node.op_type == "Gelu" and approximate is not None and approximate.value == "tanh":
        return "Gelu:tanh"
    return node.op_type


class ElementwiseRule(SiteRule):
    """``{op}-chebyshev`` (gelu-, gelu-tanh-, erf-, tanh-, sigmoid-, exp-chebyshev)."""

    name = "chebyshev"
    kinds = ("elementwise",)

    def label(self, site: Site) -> str:
        return f"{function_key(site.node).lower().replace(':', '-')}-chebyshev"

    def kind(self, site: Site) -> str:
        return function_key(site.node)

    def emit(self, site: Site, state: PolyState, b: GraphBuilder) -> tuple[ir.Value, dict]:
        x, key = site.value, function_key(site.node)
        fn, parity, constant, half_x = ELEMENTWISE[key]
        domain = state.domain(site)
        lo, hi = domain.lo, domain.hi
        if key == "Exp":
            poly = fit_to_tolerance(key, fn, lo, hi, state.tol * max(1.0, math.exp(hi)))
        else:
            if parity:  # a symmetric domain keeps the parity
                hi = max(abs(lo), abs(hi))
                lo = -hi
            poly = fit_to_tolerance(key, fn, lo, hi, state.tol, parity, max_degree=MAX_DEGREE)
        ar = OnnxArith(b)
        t, folded = scaled_input(b, x, poly.mid, poly.half, state.encrypted, state.levels)
        out = poly.evaluate_t(ar, t)
        if half_x:
            out = ar.add(ar.scale(x, 0.5), out)
        if constant:
            out = ar.shift(out, constant)
        return out, {
            "degree": poly.degree,
            "depth": poly.depth() + (0 if folded else 1),
            "max_error": poly.max_error,
            "prescale_folded": folded,
            "domain": [lo, hi],
            "observed": [domain.low, domain.high],
            "out_of_range": state.out_of_range(site, lo, hi),
        }
