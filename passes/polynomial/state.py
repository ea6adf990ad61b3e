"""What every polynomial rule reads: the ciphertext values, the calibrated ranges, the levels.

The pass builds one :class:`PolyState` per run; the rules share it. Sites are rewritten in
graph order, so before each one :meth:`PolyState.refresh` renames its value (an earlier
rewrite may have replaced it) and recounts the levels, exact up to the site.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np
import onnx_ir as ir

from txcompile.graph.build import GraphBuilder
from txcompile.graph.depth import node_levels

from . import calibrate
from .fold import fold_row_sum, fold_scale
from .sites import Site


@dataclasses.dataclass
class PolyState:
    graph: ir.Graph
    encrypted: set[ir.Value]
    sites: list[Site]  # every non-linearity, in graph order
    calib: dict[str, list[np.ndarray]]  # value name → arrays, one per calibration feed set
    heldout: dict[str, list[np.ndarray]]
    mode: str
    margin: float
    tol: float
    power: int
    levels: dict[ir.Value, int] = dataclasses.field(default_factory=dict)

    def refresh(self, site: Site) -> None:
        """Before rewriting a site: its current value and the levels up to it."""
        if not site.encrypted:
            return
        fresh = site.current_value()
        if fresh is not site.value:  # an earlier rewrite replaced it: same values, new name
            for store in (self.calib, self.heldout):
                store[fresh.name] = store[site.value.name]
            site.value, site.numerator = fresh, site.current_numerator()
        self.levels = node_levels(self.graph)[0]  # upstream sites are rewritten: exact up to here

    def domain(self, site: Site, finite_above: float | None = None) -> calibrate.Domain:
        arrays = self.calib[site.value.name]
        if finite_above is not None:
            arrays = [a[a > finite_above] for a in arrays]
        return calibrate.domain_of(arrays, self.margin)

    def out_of_range(self, site: Site, lo: float, hi: float) -> float:
        return calibrate.out_of_range_rate(self.heldout[site.value.name], lo, hi)

    def builder(self, site: Site, suffix: str = "poly") -> GraphBuilder:
        return GraphBuilder(self.graph, f"{site.node.name}/{suffix}", site.node)

    def finish(self, site: Site, b: GraphBuilder, out: ir.Value) -> list[ir.Node]:
        """Insert what ``b`` built and make ``out`` replace the site's output."""
        nodes = b.commit()
        for node in nodes:  # later sites fold through these: they must know what is ciphertext
            if any(v in self.encrypted for v in node.inputs if v is not None):
                self.encrypted.update(node.outputs)
        original = site.node.outputs[0]
        if out.shape is None:  # the same tensor, approximated: later folds read its last axis
            out.shape, out.type = original.shape, original.type
        ir.convenience.replace_all_uses_with(original, out, replace_graph_outputs=True)
        return nodes

    def scale(self, b: GraphBuilder, value: ir.Value, c: float) -> ir.Value | None:
        """c·value folded into its producer, or None."""
        return fold_scale(b, value, c, self.encrypted, levels=self.levels)

    def scaled(self, b: GraphBuilder, value: ir.Value, c: float) -> tuple[ir.Value, int]:
        """c·value folded into its producer (0 levels), else one multiply (1 level)."""
        scaled = self.scale(b, value, c)
        return (scaled, 0) if scaled is not None else (b.op("Mul", value, b.const(c)), 1)

    def row_mean(self, b: GraphBuilder, value: ir.Value, c: float) -> tuple[ir.Value, int]:
        """c·Σ value over the last axis: pushed into the producer's weights (a column), else
        the sum of a folded copy (0 levels), else the sum times c (1 level)."""
        total = fold_row_sum(b, value, c, self.encrypted, levels=self.levels)
        if total is not None:
            return total, 0
        copy, level = self.scaled(b, value, c)
        return b.op("ReduceSum", copy, b.const([-1], np.int64), keepdims=1), level


def inverse_record(plan) -> dict[str, Any]:
    """What the report says about a Newton inverse (1/u or 1/√u)."""
    return {
        "degree": plan.degree,
        "newton_steps": plan.steps,
        "depth": plan.depth(),
        "max_error": plan.max_error,
        "relative": True,
        "domain": [plan.lo, plan.hi],
    }


def max_error(exact: np.ndarray, approx: np.ndarray) -> float:
    """Max absolute error; a diverged (non-finite) result is an infinite error, never NaN,
    which ``max`` would silently skip."""
    error = np.abs(np.asarray(exact, dtype=np.float64) - approx)
    return float(error.max()) if np.isfinite(error).all() else math.inf
