"""The polynomial form of a transformer: every non-linearity on encrypted data becomes + and ×.

Per site: calibrate the input range (``--calib`` inputs, else the verification inputs), widen
it by the margin, fit the cheapest polynomial scheme meeting the tolerance, emit it as plain
ONNX ops (pre-scaling folded into the producing linear layer where possible) and report degree,
depth, max error on the domain and the out-of-range rate on held-out inputs.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import numpy as np
import onnx_ir as ir
import onnx_ir.passes.common as common

from txcompile.graph.ckks import ciphertext_values, constant_array, is_constant, violations
from txcompile.graph.depth import node_levels
from txcompile.graph.errors import TxError
from txcompile.passes.base import TxPass

from . import calibrate, composite, prepare
from .approx import LevelArith, NumpyArith, fit_to_tolerance
from .emit import GraphBuilder, OnnxArith
from .fold import fold_row_sum, fold_scale, scaled_input
from .functions import ELEMENTWISE
from .inverse import plan_inverse
from .sites import Site, find_sites

MODES = ("approx", "power-softmax")
MASKED = -1e4  # additive mask entries below this are "not allowed"
MAX_DEGREE = 127  # wide activation domains (GELU on ±35 in MiniLM's first layer) need it for 1e-3
MAX_SQUARINGS = 6  # softmax normalize-and-square rounds tried
COARSE = (0.03, 0.1, 0.2)  # relative errors tried for the reciprocals before a squaring
SUM_SLACK = 1.05  # room for the exp's own error at the edges of the row-sum bounds
MAX_EXPONENT = 600.0  # exp beyond this overflows float64 planning (e^709 is the limit)


@dataclasses.dataclass(frozen=True)
class PolynomialOptions:
    he_mode: str = "approx"  # approx, or power-softmax (softmax replaced by a normalized power)
    he_margin: float = 1.5  # fit each polynomial over the calibrated range widened by this factor
    he_tol: float = 1e-3
    he_power: int = 4
    calib: str | None = None

    def __post_init__(self) -> None:
        if self.he_mode not in MODES:
            raise TxError(f"--he-mode {self.he_mode!r}: choose approx or power-softmax")
        if self.he_margin < 1 or self.he_tol <= 0 or self.he_power < 2 or self.he_power % 2:
            raise TxError("--he-margin must be ≥ 1, --he-tol > 0 and --he-power an even integer ≥ 2")


class PolynomialForm(TxPass):
    name = "he-polynomial"
    summary = "replace every non-linearity on encrypted values by a calibrated polynomial scheme"
    exact = False
    Options = PolynomialOptions

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        options = self.options
        self.mode = options.he_mode
        self.margin = float(options.he_margin)
        self.tol = float(options.he_tol)
        self.power = int(options.he_power)
        graph = model.graph
        self.rule_counts["nan-guard"] += prepare.remove_nan_guards(graph)
        self.rule_counts["div-by-constant"] += prepare.div_by_constant(graph)
        self.rule_counts["patch-conv"] += prepare.patch_conv_to_matmul(graph)
        common.RemoveUnusedNodesPass()(model)
        _name_values(graph)
        self.encrypted = ciphertext_values(graph)
        sites = find_sites(graph, self.encrypted)
        calib_feeds, heldout_feeds = _feed_sets(model, self.context.feeds, options.calib)
        names = [s.value.name for s in sites]
        self.calib = calibrate.capture(model, names, calib_feeds) if sites else {}
        self.heldout = calibrate.capture(model, names, heldout_feeds) if sites else {}
        records = []
        for site in sites:
            fresh = site.current_value()
            if fresh is not site.value:  # an earlier rewrite replaced it: same values, new name
                for store in (self.calib, self.heldout):
                    store[fresh.name] = store[site.value.name]
                site.value, site.numerator = fresh, site.current_numerator()
            self.levels = node_levels(graph)[0]  # upstream sites are rewritten: exact up to here
            record = getattr(self, f"_{site.kind}")(graph, site)
            record.update(node=site.node.name, op=site.node.op_type)
            records.append(record)
            self.rule_counts[record["rule"]] += 1
            common.RemoveUnusedNodesPass()(model)  # dead copies must not count as users of what they read
        self.rule_counts = +self.rule_counts
        self.details.update(_summary(records), mode=self.mode, margin=self.margin, tolerance=self.tol)
        self.details["sites"] = records
        self.details["unsupported"] = violations(graph)
        return ir.passes.PassResult(model, bool(records) or bool(self.rule_counts))

    # -- helpers ------------------------------------------------------------------------------

    def _domain(self, site: Site, finite_above: float | None = None) -> calibrate.Domain:
        arrays = self.calib[site.value.name]
        if finite_above is not None:
            arrays = [a[a > finite_above] for a in arrays]
        return calibrate.domain_of(arrays, self.margin)

    def _oor(self, site: Site, lo: float, hi: float, finite_above: float | None = None) -> float:
        arrays = self.heldout[site.value.name]
        if finite_above is not None:
            arrays = [a[a > finite_above] for a in arrays]
        return calibrate.out_of_range_rate(arrays, lo, hi)

    def _finish(self, site: Site, b: GraphBuilder, out: ir.Value, rule: str) -> None:
        nodes = b.commit()
        for node in nodes:  # later sites fold through these: they must know what is ciphertext
            if any(v in self.encrypted for v in node.inputs if v is not None):
                self.encrypted.update(node.outputs)
        self.tag(nodes, rule)
        original = site.node.outputs[0]
        if out.shape is None:  # the same tensor, approximated: later folds read its last axis
            out.shape, out.type = original.shape, original.type
        ir.convenience.replace_all_uses_with(original, out, replace_graph_outputs=True)

    # -- rewrites ------------------------------------------------------------------------------

    def _elementwise(self, graph: ir.Graph, site: Site) -> dict[str, Any]:
        node, x = site.node, site.value
        key = node.op_type
        if key == "Gelu" and node.attributes.get("approximate") is not None:
            if node.attributes["approximate"].value == "tanh":
                key = "Gelu:tanh"
        fn, parity, constant, half_x = ELEMENTWISE[key]
        domain = self._domain(site)
        lo, hi = domain.lo, domain.hi
        if key == "Exp":
            poly = fit_to_tolerance(key, fn, lo, hi, self.tol * max(1.0, math.exp(hi)))
        else:
            if parity:  # a symmetric domain keeps the parity
                hi = max(abs(lo), abs(hi))
                lo = -hi
            poly = fit_to_tolerance(key, fn, lo, hi, self.tol, parity, max_degree=MAX_DEGREE)
        b = GraphBuilder(graph, node, f"{node.name}/poly")
        ar = OnnxArith(b)
        t, folded = scaled_input(b, x, poly.mid, poly.half, self.encrypted, self.levels)
        out = poly.evaluate_t(ar, t)
        if half_x:
            out = ar.add(ar.scale(x, 0.5), out)
        if constant:
            out = ar.shift(out, constant)
        self._finish(site, b, out, f"{key.lower().replace(':', '-')}-chebyshev")
        return {
            "rule": f"{key.lower().replace(':', '-')}-chebyshev",
            "kind": key,
            "degree": poly.degree,
            "depth": poly.depth() + (0 if folded else 1),
            "max_error": poly.max_error,
            "prescale_folded": folded,
            "domain": [lo, hi],
            "observed": [domain.low, domain.high],
            "out_of_range": self._oor(site, lo, hi),
        }

    def _softmax(self, graph: ir.Graph, site: Site) -> dict[str, Any]:
        node, x = site.node, site.value
        axis = node.attributes["axis"].value if "axis" in node.attributes else -1
        rank = self.calib[x.name][0].ndim
        axis = axis % rank
        if axis != rank - 1:
            raise TxError(f"Softmax {node.name!r}: only the last axis is supported (axis {axis})")
        base, plain = _split_plain_addend(x, self.encrypted)
        domain = self._domain(site, MASKED)
        calib = self.calib[x.name]
        if self.mode == "power-softmax":
            return self._power_softmax(graph, site, base, plain, domain, axis)
        n = calib[0].shape[axis]
        centered = [_centered(a) for a in calib]
        plan, error = self._plan_softmax(centered, n, calib, axis)
        b = GraphBuilder(graph, node, f"{node.name}/poly")
        rows = self._row_inputs(b, base, plain, plan.half, n)
        out = composite.softmax(OnnxArith(b), OnnxArith(b, rows.weights), rows.xs, rows.mean, plan, axis)
        self._finish(site, b, out, "softmax-exp-newton")
        depth = composite.softmax(
            LevelArith(), LevelArith(masked=True), rows.xs_level, rows.mean_level, plan, axis
        )
        error = max(
            [error]
            + [
                _max_error(_softmax_exact(a), self._softmax_numpy(a, plan, axis))
                for a in self.heldout[x.name]
            ]
        )
        domain = calibrate.domain_of([c[np.isfinite(c)] for c in centered], self.margin)
        held = [_centered(a) for a in self.heldout[x.name]]
        return {
            "rule": "softmax-exp-newton",
            "kind": "Softmax",
            "degree": plan.exp.degree,
            "depth": depth,
            "exp_depth": plan.exp.depth(),
            "reciprocal": _inverse_record(plan.recip),
            "squarings": plan.rounds,
            "square_reciprocal": _inverse_record(plan.last) if plan.rounds else None,
            "intermediate_reciprocal": _inverse_record(plan.square) if plan.square else None,
            "coarse_error": plan.coarse or None,
            "max_error": error,
            "prescale_folded": rows.xs_level == 0,
            "centering_levels": rows.mean_level,
            "domain": [domain.lo, domain.hi],
            "observed": [domain.low, domain.high],
            "masked": plain is not None,
            "out_of_range": calibrate.out_of_range_rate(
                [h[np.isfinite(h)] for h in held], domain.lo, domain.hi
            ),
        }

    def _plan_softmax(self, centered, n: int, calib, axis: int) -> tuple[composite.SoftmaxPlan, float]:
        """The shallowest sound plan (normalize-and-square rounds × the coarse error of the
        reciprocals before the last) meeting tol on the calibration rows, else the most
        accurate one.

        Each round halves the range the exp must cover, and so shrinks exponentially the range
        of row sums its reciprocal must invert, at the price of one squaring and one reciprocal
        of fixed domain.
        """
        candidates = []
        for rounds in range(MAX_SQUARINGS + 1):
            for coarse in COARSE if rounds else (0.0,):
                plan = self._softmax_plan(centered, n, rounds, coarse)
                if plan is None:  # the row sums overflow: more rounds needed
                    break
                error = max(_max_error(_softmax_exact(a), self._softmax_numpy(a, plan, axis)) for a in calib)
                depth = composite.softmax(LevelArith(), LevelArith(masked=True), 0, 0, plan, axis)
                candidates.append((depth, error, plan))
        if not candidates:
            raise TxError(f"softmax scores span more than 2^{MAX_SQUARINGS} × {MAX_EXPONENT:g} units")
        good = [c for c in candidates if c[1] <= self.tol and c[2].sound(self.tol)]
        _, error, plan = min(good, key=lambda c: c[0]) if good else min(candidates, key=lambda c: c[1])
        return plan, error

    def _softmax_plan(self, centered, n: int, rounds: int, coarse: float) -> composite.SoftmaxPlan | None:
        tol = self.tol / 2**rounds  # each squaring doubles the exp's relative error
        squeezed = [c / 2**rounds for c in centered]
        domain = calibrate.domain_of([c[np.isfinite(c)] for c in squeezed], self.margin)
        if domain.hi > MAX_EXPONENT:
            return None
        low, high = 1.0 / SUM_SLACK, _mean_exp_bound(domain.lo, domain.hi) * SUM_SLACK
        s = 2.0 / (high - low)
        recip = _reciprocal("softmax-reciprocal", s * low, coarse or self.tol)

        def target(v):
            return s * np.exp(v)

        exp = fit_to_tolerance("exp", target, domain.lo, domain.hi, tol * s)
        if not rounds:
            return composite.SoftmaxPlan(exp, recip)
        # Σy² of a probability row lies in [1/n_valid, 1]; the coarse reciprocal before widens it
        lo, hi = (1.0 - coarse) ** 2 / (n * SUM_SLACK), (1.0 + coarse) ** 2 * SUM_SLACK
        q = 2.0 / (hi - lo)
        square = _reciprocal("softmax-square-reciprocal", q * lo, coarse) if rounds > 1 else None
        last = _reciprocal("softmax-square-reciprocal", q * lo, self.tol / 2)
        return composite.SoftmaxPlan(exp, recip, rounds, square, last, q, coarse)

    def _power_softmax(self, graph, site, base, plain, domain, axis):
        node, x = site.node, site.value
        calib = self.calib[x.name]
        p = self.power
        n = calib[0].shape[axis]
        rows = np.concatenate([_masked_sum(np.where(a > MASKED, a, 0.0) ** p, a) for a in calib])
        sums = calibrate.positive_domain(rows + n * 1e-6, self.margin)
        s = 2.0 / (sums.high - sums.low)
        recip = plan_inverse(
            "power-softmax-reciprocal", 1.0, s * sums.low, s * sums.low + 2.0, self.tol, factor=True
        )
        b = GraphBuilder(graph, node, f"{node.name}/power")
        ar = OnnxArith(b)
        root = s ** (1.0 / p)
        keep = None
        if plain is not None:
            keep, finite = _keep_and_finite(b, plain)
            scaled = fold_scale(b, base, root, self.encrypted, levels=self.levels)
            folded = scaled is not None
            scaled = scaled if folded else b.op("Mul", base, b.const(root))
            xs = b.op("Mul", b.op("Add", scaled, b.op("Mul", finite, b.const(root))), keep)
        else:
            xs = fold_scale(b, x, root, self.encrypted, levels=self.levels)
            folded = xs is not None
            xs = xs if folded else b.op("Mul", x, b.const(root))
        out = composite.power_softmax(ar, xs, p, s * n * 1e-6, recip, axis)
        self._finish(site, b, out, "power-softmax")
        levels = LevelArith()
        depth = composite.power_softmax(levels, 0, p, 0.0, recip, axis) + (0 if folded else 1)
        depth += 1 if keep is not None else 0
        cost = max(_max_error(_softmax_exact(a), _power_exact(a, p, n)) for a in calib)
        return {
            "rule": "power-softmax",
            "kind": "Softmax",
            "power": p,
            "degree": p,
            "depth": depth,
            "reciprocal": _inverse_record(recip),
            "max_error": recip.max_error,
            "accuracy_cost_vs_softmax": cost,
            "prescale_folded": folded,
            "domain": [s * sums.low, s * sums.low + 2.0],
            "observed": [domain.low, domain.high],
            "masked": plain is not None,
            "out_of_range": 0.0,
        }

    def _scaled(self, b: GraphBuilder, value: ir.Value, c: float) -> tuple[ir.Value, int]:
        """c·value folded into its producer (0 levels), else one multiply (1 level)."""
        scaled = fold_scale(b, value, c, self.encrypted, levels=self.levels)
        return (scaled, 0) if scaled is not None else (b.op("Mul", value, b.const(c)), 1)

    def _row_mean(self, b: GraphBuilder, value: ir.Value, c: float) -> tuple[ir.Value, int]:
        """c·Σ value over the last axis: pushed into the producer's weights (a column), else
        the sum of a folded copy (0 levels), else the sum times c (1 level)."""
        total = fold_row_sum(b, value, c, self.encrypted, levels=self.levels)
        if total is not None:
            return total, 0
        copy, level = self._scaled(b, value, c)
        return b.op("ReduceSum", copy, b.const([-1], np.int64), keepdims=1), level

    def _row_inputs(self, b: GraphBuilder, base, plain, half: float, n: int) -> _RowInputs:
        """xs = x/half, its row mean and the plaintext row weights.

        Without a mask the mean, Σx/(n·half), is made from x beside xs, so it costs no level;
        with one it is Σ xs·keep/n_valid, one level (the weights are per row and position, so
        they cannot ride on a weight matrix).
        """
        xs, xs_level = self._scaled(b, base, 1.0 / half)
        if plain is None:
            mean, mean_level = self._row_mean(b, base, 1.0 / (half * n))
            return _RowInputs(b.const(1.0 / n), xs, mean, xs_level, mean_level)
        keep, finite = _keep_and_finite(b, plain)
        valid = b.op("ReduceSum", keep, b.const([-1], np.int64), keepdims=1)
        weights = b.op("Div", keep, b.op("Max", valid, b.const(1.0)))
        xs = b.op("Add", xs, b.op("Mul", finite, b.const(1.0 / half)))
        mean = b.op("ReduceSum", b.op("Mul", xs, weights), b.const([-1], np.int64), keepdims=1)
        return _RowInputs(weights, xs, mean, xs_level, xs_level + 1)

    def _centering_copies(self, b: GraphBuilder, x: ir.Value, root: float, n: int) -> tuple | None:
        """(√s·x, √s·mean x) at x's level, both folded into x's producer, or None."""
        scaled = fold_scale(b, x, root, self.encrypted, levels=self.levels)
        if scaled is None:
            return None
        mean, level = self._row_mean(b, x, root / n)
        return (scaled, mean) if level == 0 else None

    def _softmax_numpy(self, a: np.ndarray, plan: composite.SoftmaxPlan, axis: int) -> np.ndarray:
        keep = (a > MASKED).astype(np.float64)
        weights = keep / np.maximum(keep.sum(-1, keepdims=True), 1.0)
        xs = np.where(keep > 0, a, 0.0) / plan.half
        mean = (xs * weights).sum(-1, keepdims=True)
        return composite.softmax(NumpyArith(), NumpyArith(weights), xs, mean, plan, axis)

    def _layernorm(self, graph: ir.Graph, site: Site) -> dict[str, Any]:
        node, x = site.node, site.value
        axis = node.attributes["axis"].value if "axis" in node.attributes else -1
        calib = self.calib[x.name]
        rank = calib[0].ndim
        if axis % rank != rank - 1:
            raise TxError(f"LayerNormalization {node.name!r}: only the last axis is supported")
        eps = node.attributes["epsilon"].value if "epsilon" in node.attributes else 1e-5
        n = calib[0].shape[-1]
        gamma = _const_or_fail(node, 1)
        beta = _const_or_fail(node, 2) if len(node.inputs) > 2 and node.inputs[2] is not None else None
        totals = np.concatenate([(n * a.var(-1)).ravel() for a in calib])
        sums = calibrate.positive_domain(totals, self.margin)
        s = 2.0 / (sums.high - sums.low)
        offset = s * n * eps
        isqrt = plan_inverse(
            "layernorm-isqrt", 0.5, s * sums.low + offset, s * sums.low + offset + 2.0, self.tol, factor=True
        )
        b = GraphBuilder(graph, node, f"{node.name}/poly")
        ar = OnnxArith(b)
        g = b.const(gamma.astype(np.float64) * math.sqrt(n))
        bt = b.const(beta) if beta is not None else None
        root = math.sqrt(s)
        copies = self._centering_copies(b, x, root, n)
        out = composite.layernorm(ar, x, n, s, eps, isqrt, g, bt, -1, copies)
        self._finish(site, b, out, "layernorm-newton-isqrt")
        at_x = (0, 0) if copies else None
        depth = composite.layernorm(LevelArith(), 0, n, s, eps, isqrt, 0, None, -1, at_x)
        error = 0.0
        for a in [*calib, *self.heldout[x.name]]:
            exact = _layernorm_exact(a, gamma, eps)
            scaled = (a * root, a.sum(-1, keepdims=True) * (root / n)) if copies else None
            approx = composite.layernorm(
                NumpyArith(), a, n, s, eps, isqrt, gamma * math.sqrt(n), None, -1, scaled
            )
            error = max(error, _max_error(exact, approx))
        held = np.concatenate([(n * a.var(-1)).ravel() for a in self.heldout[x.name]])
        return {
            "rule": "layernorm-newton-isqrt",
            "kind": "LayerNorm",
            "degree": isqrt.degree,
            "depth": depth,
            "isqrt": _inverse_record(isqrt),
            "centering_levels": 0 if copies else 1,
            "max_error": error,
            "domain": [sums.low, sums.high],
            "observed": [float(totals.min()), float(totals.max())],
            "out_of_range": calibrate.out_of_range_rate([held], sums.low, sums.high),
        }

    def _inverse_site(self, graph: ir.Graph, site: Site, power: float, rule: str) -> dict[str, Any]:
        node, v = site.node, site.value
        values = np.concatenate([a.ravel() for a in self.calib[v.name]])
        if values.min() <= 0:
            raise TxError(
                f"{node.op_type} {node.name!r}: input reaches {values.min():.3g} ≤ 0 on calibration"
            )
        dom = calibrate.positive_domain(values, self.margin)
        s = 2.0 / (dom.high - dom.low)
        factor = v if site.kind == "sqrt" else site.numerator  # √v = v/√v; a/v or a/√v
        inside = factor is not None and self.levels.get(factor, 0) <= self.levels.get(v, 0)
        plan = plan_inverse(rule, power, s * dom.low, s * dom.low + 2.0, self.tol, factor=inside)
        b = GraphBuilder(graph, node, f"{node.name}/poly")
        ar = OnnxArith(b)
        scaled = fold_scale(b, v, s, self.encrypted, levels=self.levels)
        folded = scaled is not None
        if scaled is None:
            scaled = b.op("Mul", v, b.const(s))
        k = s**power
        # a factor no deeper than v joins the last Newton step; a deeper one multiplies after
        t = ar.shift(scaled, -plan.guess.mid)
        y = plan.evaluate(ar, scaled, t=t, k=k, factor=factor if inside else None)
        u = 0 if folded else 1
        depth = plan.evaluate(LevelArith(), u, t=u, k=k, factor=0 if inside else None)
        if factor is not None and not inside:
            y, depth = ar.mul(factor, y), depth + 1
        self._finish(site, b, y, f"{site.kind}-newton")
        held = np.concatenate([a.ravel() for a in self.heldout[v.name]])
        return {
            "rule": f"{site.kind}-newton",
            "kind": site.kind,
            **_inverse_record(plan),
            "depth": depth,
            "prescale_folded": folded,
            "domain": [dom.low, dom.high],
            "observed": [float(values.min()), float(values.max())],
            "out_of_range": calibrate.out_of_range_rate([held], dom.low, dom.high),
        }

    def _invsqrt(self, graph, site):
        return self._inverse_site(graph, site, 0.5, "invsqrt")

    def _sqrt(self, graph, site):
        return self._inverse_site(graph, site, 0.5, "sqrt")

    def _reciprocal(self, graph, site):
        return self._inverse_site(graph, site, 1.0, "reciprocal")


@dataclasses.dataclass
class _RowInputs:
    """A softmax's inputs: the scaled scores, their row mean, the row weights."""

    weights: ir.Value
    xs: ir.Value
    mean: ir.Value
    xs_level: int  # levels above the scores
    mean_level: int


@functools.lru_cache(maxsize=256)
def _reciprocal(name: str, lo: float, tol: float):
    """1/u on [lo, lo + 2] times a factor at u's level (softmax plans share them across rounds)."""
    return plan_inverse(name, 1.0, lo, lo + 2.0, tol, factor=True)


def _inverse_record(plan) -> dict[str, Any]:
    return {
        "degree": plan.degree,
        "newton_steps": plan.steps,
        "depth": plan.depth(),
        "max_error": plan.max_error,
        "relative": True,
        "domain": [plan.lo, plan.hi],
    }


def _summary(records: list[dict]) -> dict[str, Any]:
    worst: dict[str, dict] = {}
    for r in records:
        if r["kind"] not in worst or r["depth"] > worst[r["kind"]]["depth"]:
            worst[r["kind"]] = {"depth": r["depth"], "degree": r["degree"], "max_error": r["max_error"]}
    return {"per_nonlinearity": worst}


def _split_plain_addend(x: ir.Value, encrypted: set[ir.Value]):
    """x = base + plaintext mask → (base, mask); else (x, None)."""
    node = x.producer()
    if node is None or node.op_type != "Add" or len(x.uses()) != 1:
        return x, None
    a, b = node.inputs
    if a in encrypted and b not in encrypted:
        return a, b
    if b in encrypted and a not in encrypted:
        return b, a
    return x, None


def _keep_and_finite(b: GraphBuilder, plain: ir.Value):
    """Client-side: a 0/1 keep mask and the mask's finite part (both plaintext)."""
    allowed = b.op("Greater", plain, b.const(MASKED))
    keep = b.op("Cast", allowed, to=ir.DataType.FLOAT)
    finite = b.op("Where", allowed, plain, b.const(0.0))
    return keep, finite


def _centered(a: np.ndarray) -> np.ndarray:
    """Each row minus its mean over allowed entries; masked entries become NaN."""
    keep = a > MASKED
    mean = np.where(keep, a, 0.0).sum(-1, keepdims=True) / np.maximum(keep.sum(-1, keepdims=True), 1)
    return np.where(keep, a - mean, np.nan)


def _mean_exp_bound(lo: float, hi: float) -> float:
    """The largest mean(exp(c)) over rows with mean(c) = 0 and every c in [lo, hi].

    exp is convex, so the worst row puts all its mass on lo and hi (in the proportion that
    keeps the mean at 0); Jensen gives the lower bound, 1. Any row the exp's domain covers has
    its sum in [1, this]: the reciprocal planned on it cannot be pushed past its domain.
    """
    if not lo < 0 < hi:
        return math.exp(max(hi, 0.0))
    return (-lo * math.exp(hi) + hi * math.exp(lo)) / (hi - lo)


def _masked_sum(values: np.ndarray, raw: np.ndarray) -> np.ndarray:
    return np.where(raw > MASKED, values, 0.0).sum(-1).ravel()


def _softmax_exact(a: np.ndarray) -> np.ndarray:
    z = np.where(a > MASKED, a, -np.inf)
    z = np.exp(z - z.max(-1, keepdims=True))
    return z / z.sum(-1, keepdims=True)


def _power_exact(a: np.ndarray, p: int, n: int) -> np.ndarray:
    z = np.where(a > MASKED, a, 0.0) ** p
    return z / (n * 1e-6 + z.sum(-1, keepdims=True))


def _layernorm_exact(a: np.ndarray, gamma: np.ndarray, eps: float) -> np.ndarray:
    return (a - a.mean(-1, keepdims=True)) / np.sqrt(a.var(-1, keepdims=True) + eps) * gamma


def _max_error(exact: np.ndarray, approx: np.ndarray) -> float:
    """Max absolute error; a diverged (non-finite) result is an infinite error, never NaN,
    which ``max`` would silently skip."""
    error = np.abs(np.asarray(exact, dtype=np.float64) - approx)
    return float(error.max()) if np.isfinite(error).all() else math.inf


def _const_or_fail(node: ir.Node, index: int) -> np.ndarray:
    value = node.inputs[index]
    if not is_constant(value):
        raise TxError(f"{node.op_type} {node.name!r}: input {index} must be a constant")
    return constant_array(value).astype(np.float64)


def _name_values(graph: ir.Graph) -> None:
    taken = {v.name for n in graph for v in n.outputs if v.name}
    for i, node in enumerate(graph):
        for j, value in enumerate(node.outputs):
            if not value.name:
                name = f"poly_{i}_{j}"
                while name in taken:
                    name += "_"
                value.name = name
                taken.add(name)


def _feed_sets(model: ir.Model, feeds: dict[str, np.ndarray], calib_path: str | None):
    """Calibration and held-out feed sets: ``--calib`` then the verification inputs, or the
    verification inputs then fresh random ones drawn the same way."""
    from txcompile.graph import inputs as model_inputs

    if not feeds:
        raise TxError("he-polynomial needs verification inputs to calibrate on")
    if calib_path:
        proto = ir.serde.serialize_model(model)
        specs = model_inputs.read_specs(proto)
        return _chunks(model, model_inputs.load_npz(calib_path, specs)), [feeds]
    proto = ir.serde.serialize_model(model)
    specs = model_inputs.read_specs(proto)
    first = next(iter(feeds.values()))
    dims = {"batch": first.shape[0]}
    if first.ndim >= 2:
        dims["seq"] = first.shape[1]
    return [feeds], [model_inputs.make_feeds(specs, dims, seed=1)]


def _chunks(model: ir.Model, feeds: dict[str, np.ndarray]) -> list[dict[str, np.ndarray]]:
    """A calibration file may hold k × the static batch of a static-shape model: split it."""
    batch = None
    for value in model.graph.inputs:
        if value.shape is not None and len(value.shape) and isinstance(value.shape[0], int):
            batch = value.shape[0]
            break
    total = next(iter(feeds.values())).shape[0]
    if batch is None or total == batch:
        return [feeds]
    if total % batch:
        raise TxError(f"--calib holds {total} samples: a multiple of the model's batch {batch} is needed")
    return [{k: v[i : i + batch] for k, v in feeds.items()} for i in range(0, total, batch)]
