"""1/√v, √v and 1/v on ciphertext as Newton iterations from a polynomial guess.

``invsqrt-newton``: Div(a, Sqrt(v)) or Reciprocal(Sqrt(v)) when the Sqrt is only ever divided
by (RMSNorm); ``sqrt-newton``: a Sqrt with other users, as v·(1/√v); ``reciprocal-newton``:
any other Div by ciphertext or Reciprocal. A numerator no deeper than v joins the last Newton
step for free.
"""

from __future__ import annotations

from typing import ClassVar

import numpy as np
import onnx_ir as ir

from txcompile.graph.build import GraphBuilder
from txcompile.graph.errors import TxError

from . import calibrate
from .approx import LevelArith
from .emit import OnnxArith
from .inverse import plan_inverse
from .site_rule import SiteRule
from .sites import Site
from .state import PolyState, inverse_record

PLAIN_DIVISOR = "plaintext divisor of a ciphertext: no rule for it (he-contract reports the Div)"


class InverseRule(SiteRule):
    """v^(−power) (times a factor), v pre-scaled into the Newton domain [lo, lo + 2]."""

    plan_name: ClassVar[str]
    power: ClassVar[float]

    def check(self, site: Site, state: PolyState) -> str | None:
        if not site.encrypted and site.numerator in state.encrypted:
            return PLAIN_DIVISOR
        return super().check(site, state)

    def contract(self, site: Site, state: PolyState) -> None:
        values = np.concatenate([a.ravel() for a in state.calib[site.value.name]])
        if values.min() <= 0:
            node = site.node
            raise TxError(
                f"{node.op_type} {node.name!r}: input reaches {values.min():.3g} ≤ 0 on calibration"
            )

    def emit(self, site: Site, state: PolyState, b: GraphBuilder) -> tuple[ir.Value, dict]:
        v = site.value
        values = np.concatenate([a.ravel() for a in state.calib[v.name]])
        dom = calibrate.positive_domain(values, state.margin)
        s = 2.0 / (dom.high - dom.low)
        factor = v if site.kind == "sqrt" else site.numerator  # √v = v/√v; a/v or a/√v
        inside = factor is not None and state.levels.get(factor, 0) <= state.levels.get(v, 0)
        lo = s * dom.low
        plan = plan_inverse(self.plan_name, self.power, lo, lo + 2.0, state.tol, factor=inside)
        ar = OnnxArith(b)
        scaled = state.scale(b, v, s)
        folded = scaled is not None
        if scaled is None:
            scaled = b.op("Mul", v, b.const(s))
        k = s**self.power
        # a factor no deeper than v joins the last Newton step; a deeper one multiplies after
        t = ar.shift(scaled, -plan.guess.mid)
        y = plan.evaluate(ar, scaled, t=t, k=k, factor=factor if inside else None)
        u = 0 if folded else 1
        depth = plan.evaluate(LevelArith(), u, t=u, k=k, factor=0 if inside else None)
        if factor is not None and not inside:
            y, depth = ar.mul(factor, y), depth + 1
        held = np.concatenate([a.ravel() for a in state.heldout[v.name]])
        return y, {
            **inverse_record(plan),
            "depth": depth,
            "prescale_folded": folded,
            "domain": [dom.low, dom.high],
            "observed": [float(values.min()), float(values.max())],
            "out_of_range": calibrate.out_of_range_rate([held], dom.low, dom.high),
        }


class InvSqrtRule(InverseRule):
    name = "invsqrt-newton"
    kinds = ("invsqrt",)
    plan_name, power = "invsqrt", 0.5


class SqrtRule(InverseRule):
    name = "sqrt-newton"
    kinds = ("sqrt",)
    plan_name, power = "sqrt", 0.5


class ReciprocalRule(InverseRule):
    name = "reciprocal-newton"
    kinds = ("reciprocal",)
    plan_name, power = "reciprocal", 1.0
