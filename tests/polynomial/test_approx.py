"""Approximation helpers over their declared domains (hypothesis), and the depth targets."""

from __future__ import annotations

import math

import numpy as np
import onnx_ir as ir
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from numpy.polynomial import chebyshev as cheb

from txcompile.graph import ort as rt
from txcompile.graph.build import GraphBuilder
from txcompile.graph.depth import depth_report
from txcompile.passes.polynomial.approx import (
    LevelArith,
    NumpyArith,
    chebyshev_sum,
    fit_chebyshev,
    fit_to_tolerance,
)
from txcompile.passes.polynomial.emit import OnnxArith
from txcompile.passes.polynomial.functions import erf, gelu_even, sigmoid_odd
from txcompile.passes.polynomial.inverse import NewtonInverse, plan_inverse

GELU = fit_to_tolerance("gelu", gelu_even, -8.0, 8.0, 1e-3, "even")
TANH = fit_to_tolerance("tanh", np.tanh, -4.0, 4.0, 1e-3, "odd")
SIGMOID = fit_to_tolerance("sigmoid", sigmoid_odd, -6.0, 6.0, 1e-3, "odd")
ERF = fit_to_tolerance("erf", erf, -3.0, 3.0, 1e-3, "odd")
EXP = fit_to_tolerance("exp", np.exp, -20.0, 0.0, 1e-3)
RECIPROCAL = plan_inverse("reciprocal", 1.0, 0.1, 2.1, 1e-3)
INVSQRT = plan_inverse("invsqrt", 0.5, 0.05, 2.05, 1e-3)


@pytest.mark.parametrize(
    ("approx", "fn", "limit"),
    [(GELU, gelu_even, 5), (EXP, np.exp, 4), (TANH, np.tanh, 5), (SIGMOID, sigmoid_odd, 4), (ERF, erf, 4)],
    ids=["gelu", "exp", "tanh", "sigmoid", "erf"],
)
def test_depth_targets_at_1e3(approx, fn, limit):
    assert approx.max_error <= 1e-3
    assert approx.depth() <= limit


def test_parity_keeps_only_matching_terms():
    assert not np.any(GELU.coeffs[1::2])
    assert not np.any(TANH.coeffs[0::2])


@settings(max_examples=200, deadline=None)
@given(st.floats(-8.0, 8.0))
def test_gelu_within_error_on_domain(x):
    assert abs(GELU(np.array([x]))[0] - gelu_even(np.array([x]))[0]) <= 1e-3


@settings(max_examples=200, deadline=None)
@given(st.floats(-20.0, 0.0))
def test_exp_within_error_on_domain(x):
    assert abs(EXP(np.array([x]))[0] - math.exp(x)) <= 1e-3


@settings(max_examples=200, deadline=None)
@given(st.floats(0.1, 2.1))
def test_reciprocal_relative_error(u):
    assert abs(RECIPROCAL(np.array([u]))[0] * u - 1.0) <= 1e-3


@settings(max_examples=200, deadline=None)
@given(st.floats(0.05, 2.05))
def test_invsqrt_relative_error(u):
    assert abs(INVSQRT(np.array([u]))[0] * math.sqrt(u) - 1.0) <= 1e-3


@settings(max_examples=50, deadline=None)
@given(st.floats(0.05, 2.05), st.floats(0.2, 5.0))
def test_output_factor_of_newton_rides_free(u, k):
    """k·u^(-1/2) costs the same depth as u^(-1/2)."""
    value = INVSQRT.evaluate(NumpyArith(), np.array([u]), k=k)[0]
    assert abs(value * math.sqrt(u) / k - 1.0) <= 1e-3
    assert INVSQRT.evaluate(LevelArith(), 0, t=0, k=k) <= INVSQRT.depth() + 1


def test_outside_the_domain_is_not_promised():
    """A negative: far outside its domain the polynomial is wrong, which is why ranges are calibrated."""
    assert abs(GELU(np.array([30.0]))[0] - gelu_even(np.array([30.0]))[0]) > 1e-2


def test_onnx_emission_matches_numpy_scheme():
    """The emitted graph computes what the numpy scheme computes (fp32 vs fp64)."""
    x = ir.Value(name="x", type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape([1000]))
    graph = ir.Graph([x], [], nodes=[], opset_imports={"": 20})
    anchor = ir.node("Identity", [x])
    graph.append(anchor)
    builder = GraphBuilder(graph, "t", anchor)
    y = GELU.evaluate(OnnxArith(builder), x)
    builder.commit()
    y.name = "y"
    graph.outputs.append(y)
    graph.remove(anchor, safe=True)
    proto = ir.serde.serialize_model(ir.Model(graph, ir_version=10))
    xs = np.linspace(-8, 8, 1000).astype(np.float32)
    got = rt.run(rt.create_session(proto, optimize=False), {"x": xs})["y"]
    assert np.max(np.abs(got - GELU(xs.astype(np.float64)))) < 1e-4


@pytest.mark.parametrize("degree", [1, 3, 7, 12, 15, 16, 63, 64, 127])
def test_degree_d_costs_log2_of_d_plus_1(degree):
    """Recursive Chebyshev division: degree 2^k − 1 in k levels (the per-term scheme paid k + 1)."""
    rng = np.random.default_rng(degree)
    coeffs = rng.standard_normal(degree + 1) / np.arange(1, degree + 2)
    t = np.linspace(-1.0, 1.0, 501)
    value = chebyshev_sum(NumpyArith(), t, coeffs)
    assert np.max(np.abs(value - cheb.chebval(t, coeffs))) < 1e-12
    levels = LevelArith()
    assert chebyshev_sum(levels, 0, coeffs) == math.ceil(math.log2(degree + 1))
    assert levels.ct_ct <= degree  # about d/2 products, not one per term


def test_parity_zeros_cost_no_products():
    odd = np.zeros(16)
    odd[1::2] = np.random.default_rng(1).uniform(0.1, 1.0, 8)
    levels = LevelArith()
    assert chebyshev_sum(levels, 0, odd) == 4 and levels.ct_pt == 8  # one coefficient per odd term
    t = np.linspace(-1.0, 1.0, 101)
    assert np.max(np.abs(chebyshev_sum(NumpyArith(), t, odd) - cheb.chebval(t, odd))) < 1e-12


def _newton(guess: np.ndarray, u: np.ndarray, steps: int) -> np.ndarray:
    y = guess
    for _ in range(steps):
        y = y * (2.0 - u * y)
    return y


@pytest.mark.parametrize("steps", [1, 2, 3])
def test_goldschmidt_is_newton_at_one_level_a_step(steps):
    """y·Π(1 + e^(2^i)) is Newton's y(2 − uy) iterated: same numbers, steps + 1 levels, not 2·steps."""
    guess = fit_chebyshev("guess", lambda x: 1.0 / x, 0.02, 2.02, 7)
    plan = NewtonInverse("r", 1.0, guess, steps)
    u = np.linspace(0.02, 2.02, 2001)
    expected = _newton(guess(u), u, steps)
    assert np.max(np.abs(plan(u) - expected) / expected) < 1e-12
    assert plan.depth() == guess.depth() + steps + 1


@pytest.mark.parametrize(("power", "steps"), [(1.0, 0), (1.0, 2), (0.5, 0), (0.5, 1), (0.5, 2)])
def test_factor_joins_the_last_newton_step(power, steps):
    """F·u^(-p) with F at u's level: free with a Newton step, one level after a bare guess."""
    guess = fit_chebyshev("guess", lambda x: x**-power, 0.05, 2.05, 7)
    plan = NewtonInverse("inv", power, guess, steps)
    u = np.linspace(0.05, 2.05, 1001)
    f = np.cos(7.0 * u)
    with_factor = plan.evaluate(NumpyArith(), u, factor=f)
    assert np.max(np.abs(with_factor - f * plan(u))) < 1e-12
    assert plan.depth(factor=True) == plan.depth() + (0 if steps else 1)


def test_emitted_inverse_with_factor_costs_what_levels_count():
    """ORT runs F·u^(-1/2) as numpy computes it, and depth.py counts the levels LevelArith does."""
    inputs = [ir.Value(name=n, type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape([500])) for n in "uf"]
    graph = ir.Graph(inputs, [], nodes=[], opset_imports={"": 20})
    anchor = ir.node("Identity", [inputs[0]])
    graph.append(anchor)
    builder = GraphBuilder(graph, "t", anchor)
    plan = plan_inverse("invsqrt", 0.5, 0.05, 2.05, 1e-3, factor=True)
    y = plan.evaluate(OnnxArith(builder), inputs[0], factor=inputs[1])
    builder.commit()
    y.name = "y"
    graph.outputs.append(y)
    graph.remove(anchor, safe=True)
    model = ir.Model(graph, ir_version=10)
    assert depth_report(model)["depth"] == plan.depth(folded=False, factor=True)
    u = np.linspace(0.05, 2.05, 500).astype(np.float32)
    f = np.linspace(-3.0, 3.0, 500).astype(np.float32)
    got = rt.run(rt.create_session(ir.serde.serialize_model(model), optimize=False), {"u": u, "f": f})["y"]
    assert np.max(np.abs(got - f / np.sqrt(u.astype(np.float64)))) < 3e-3
