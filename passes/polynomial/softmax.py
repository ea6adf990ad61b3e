"""Softmax as exp polynomial + Newton reciprocal, centered on the row mean (``softmax-exp-newton``).

The row max is unknowable under encryption; the mean is a sum. Scores spanning many units are
normalized and squared (softmax(2z) = softmax(z)²/Σ softmax(z)²) so one exp polynomial covers
them; the plan is chosen in :mod:`.softmax_plan`. A plaintext additive mask becomes 0/1 row
weights riding on the exp's coefficients.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx_ir as ir

from txcompile.graph.build import GraphBuilder
from txcompile.graph.errors import TxError

from . import calibrate, composite
from .approx import LevelArith
from .emit import OnnxArith
from .masks import keep_and_finite, softmax_exact, split_plain_addend
from .site_rule import SiteRule
from .sites import Site
from .softmax_plan import centered, plan_softmax, softmax_numpy
from .state import PolyState, inverse_record, max_error


def last_axis(site: Site, state: PolyState) -> int:
    """The softmax axis, which must be the last (rows are what the reciprocal normalizes)."""
    node = site.node
    axis = node.attributes["axis"].value if "axis" in node.attributes else -1
    rank = state.calib[site.value.name][0].ndim
    axis = axis % rank
    if axis != rank - 1:
        raise TxError(f"Softmax {node.name!r}: only the last axis is supported (axis {axis})")
    return axis


@dataclasses.dataclass
class RowInputs:
    """A softmax's inputs: the scaled scores, their row mean, the row weights."""

    weights: ir.Value
    xs: ir.Value
    mean: ir.Value
    xs_level: int  # levels above the scores
    mean_level: int


def row_inputs(state: PolyState, b: GraphBuilder, base, plain, half: float, n: int) -> RowInputs:
    """xs = x/half, its row mean and the plaintext row weights.

    Without a mask the mean, Σx/(n·half), is made from x beside xs, so it costs no level;
    with one it is Σ xs·keep/n_valid, one level (the weights are per row and position, so
    they cannot ride on a weight matrix).
    """
    xs, xs_level = state.scaled(b, base, 1.0 / half)
    if plain is None:
        mean, mean_level = state.row_mean(b, base, 1.0 / (half * n))
        return RowInputs(b.const(1.0 / n), xs, mean, xs_level, mean_level)
    keep, finite = keep_and_finite(b, plain)
    valid = b.op("ReduceSum", keep, b.const([-1], np.int64), keepdims=1)
    weights = b.op("Div", keep, b.op("Max", valid, b.const(1.0)))
    xs = b.op("Add", xs, b.op("Mul", finite, b.const(1.0 / half)))
    mean = b.op("ReduceSum", b.op("Mul", xs, weights), b.const([-1], np.int64), keepdims=1)
    return RowInputs(weights, xs, mean, xs_level, xs_level + 1)


class SoftmaxRule(SiteRule):
    """``softmax-exp-newton`` (``--he-mode approx``)."""

    name = "softmax-exp-newton"
    kinds = ("softmax",)
    modes = ("approx",)

    def kind(self, site: Site) -> str:
        return "Softmax"

    def contract(self, site: Site, state: PolyState) -> None:
        last_axis(site, state)

    def emit(self, site: Site, state: PolyState, b: GraphBuilder) -> tuple[ir.Value, dict]:
        x, axis = site.value, last_axis(site, state)
        base, plain = split_plain_addend(x, state.encrypted)
        calib = state.calib[x.name]
        n = calib[0].shape[axis]
        rows_c = [centered(a) for a in calib]
        plan, error = plan_softmax(rows_c, n, calib, axis, state.tol, state.margin)
        rows = row_inputs(state, b, base, plain, plan.half, n)
        out = composite.softmax(OnnxArith(b), OnnxArith(b, rows.weights), rows.xs, rows.mean, plan, axis)
        depth = composite.softmax(
            LevelArith(), LevelArith(masked=True), rows.xs_level, rows.mean_level, plan, axis
        )
        held = state.heldout[x.name]
        error = max([error] + [max_error(softmax_exact(a), softmax_numpy(a, plan, axis)) for a in held])
        domain = calibrate.domain_of([c[np.isfinite(c)] for c in rows_c], state.margin)
        held_c = [centered(a) for a in held]
        return out, {
            "degree": plan.exp.degree,
            "depth": depth,
            "exp_depth": plan.exp.depth(),
            "reciprocal": inverse_record(plan.recip),
            "squarings": plan.rounds,
            "square_reciprocal": inverse_record(plan.last) if plan.rounds else None,
            "intermediate_reciprocal": inverse_record(plan.square) if plan.square else None,
            "coarse_error": plan.coarse or None,
            "max_error": error,
            "prescale_folded": rows.xs_level == 0,
            "centering_levels": rows.mean_level,
            "domain": [domain.lo, domain.hi],
            "observed": [domain.low, domain.high],
            "masked": plain is not None,
            "out_of_range": calibrate.out_of_range_rate(
                [h[np.isfinite(h)] for h in held_c], domain.lo, domain.hi
            ),
        }
