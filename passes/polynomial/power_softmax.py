"""Power-Softmax (``--he-mode power-softmax``): softmax replaced by x^p / (ε + Σ x^p).

Not the same function: the record states the accuracy it costs against the true softmax on
the calibration rows. Cheaper than exp + centering: one integer power and one reciprocal.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from txcompile.graph.build import GraphBuilder

from . import calibrate, composite
from .approx import LevelArith
from .emit import OnnxArith
from .inverse import plan_inverse
from .masks import MASKED, keep_and_finite, masked_sum, softmax_exact, split_plain_addend
from .site_rule import SiteRule
from .sites import Site
from .softmax import last_axis
from .state import PolyState, inverse_record, max_error

EPSILON = 1e-6  # per entry: keeps the denominator off zero for an all-zero row


def power_exact(a: np.ndarray, p: int, n: int) -> np.ndarray:
    z = np.where(a > MASKED, a, 0.0) ** p
    return z / (n * EPSILON + z.sum(-1, keepdims=True))


class PowerSoftmaxRule(SiteRule):
    name = "power-softmax"
    kinds = ("softmax",)
    modes = ("power-softmax",)
    prefix = "power"

    def kind(self, site: Site) -> str:
        return "Softmax"

    def contract(self, site: Site, state: PolyState) -> None:
        last_axis(site, state)

    def emit(self, site: Site, state: PolyState, b: GraphBuilder) -> tuple[ir.Value, dict]:
        x, axis, p = site.value, last_axis(site, state), state.power
        base, plain = split_plain_addend(x, state.encrypted)
        domain = state.domain(site, MASKED)
        calib = state.calib[x.name]
        n = calib[0].shape[axis]
        rows = np.concatenate([masked_sum(np.where(a > MASKED, a, 0.0) ** p, a) for a in calib])
        sums = calibrate.positive_domain(rows + n * EPSILON, state.margin)
        s = 2.0 / (sums.high - sums.low)
        recip = plan_inverse(
            "power-softmax-reciprocal", 1.0, s * sums.low, s * sums.low + 2.0, state.tol, factor=True
        )
        root = s ** (1.0 / p)
        keep = None
        if plain is not None:
            keep, finite = keep_and_finite(b, plain)
            scaled = state.scale(b, base, root)
            folded = scaled is not None
            scaled = scaled if folded else b.op("Mul", base, b.const(root))
            xs = b.op("Mul", b.op("Add", scaled, b.op("Mul", finite, b.const(root))), keep)
        else:
            xs = state.scale(b, x, root)
            folded = xs is not None
            xs = xs if folded else b.op("Mul", x, b.const(root))
        out = composite.power_softmax(OnnxArith(b), xs, p, s * n * EPSILON, recip, axis)
        depth = composite.power_softmax(LevelArith(), 0, p, 0.0, recip, axis) + (0 if folded else 1)
        depth += 1 if keep is not None else 0
        cost = max(max_error(softmax_exact(a), power_exact(a, p, n)) for a in calib)
        return out, {
            "power": p,
            "degree": p,
            "depth": depth,
            "reciprocal": inverse_record(recip),
            "max_error": recip.max_error,
            "accuracy_cost_vs_softmax": cost,
            "prescale_folded": folded,
            "domain": [s * sums.low, s * sums.low + 2.0],
            "observed": [domain.low, domain.high],
            "masked": plain is not None,
            "out_of_range": 0.0,
        }
