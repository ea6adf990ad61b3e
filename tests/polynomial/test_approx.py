"""Approximation helpers over their declared domains (hypothesis), and the depth targets."""

from __future__ import annotations

import math

import numpy as np
import onnx_ir as ir
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from txcompile.passes.polynomial.approx import LevelArith, NumpyArith, fit_to_tolerance
from txcompile.passes.polynomial.emit import GraphBuilder, OnnxArith
from txcompile.passes.polynomial.functions import erf, gelu_even, sigmoid_odd
from txcompile.passes.polynomial.inverse import plan_inverse
from txcompile.runtime import session as rt

GELU = fit_to_tolerance("gelu", gelu_even, -8.0, 8.0, 1e-3, "even")
TANH = fit_to_tolerance("tanh", np.tanh, -4.0, 4.0, 1e-3, "odd")
SIGMOID = fit_to_tolerance("sigmoid", sigmoid_odd, -6.0, 6.0, 1e-3, "odd")
ERF = fit_to_tolerance("erf", erf, -3.0, 3.0, 1e-3, "odd")
EXP = fit_to_tolerance("exp", np.exp, -20.0, 0.0, 1e-3)
RECIPROCAL = plan_inverse("reciprocal", 1.0, 0.1, 2.1, 1e-3)
INVSQRT = plan_inverse("invsqrt", 0.5, 0.05, 2.05, 1e-3)


@pytest.mark.parametrize(
    ("approx", "fn", "limit"),
    [(GELU, gelu_even, 6), (EXP, np.exp, 5), (TANH, np.tanh, 6), (SIGMOID, sigmoid_odd, 6), (ERF, erf, 6)],
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
    builder = GraphBuilder(graph, anchor, "t")
    y = GELU.evaluate(OnnxArith(builder), x)
    builder.commit()
    y.name = "y"
    graph.outputs.append(y)
    graph.remove(anchor, safe=True)
    proto = ir.serde.serialize_model(ir.Model(graph, ir_version=10))
    xs = np.linspace(-8, 8, 1000).astype(np.float32)
    got = rt.run(rt.create_session(proto, optimize=False), {"x": xs})["y"]
    assert np.max(np.abs(got - GELU(xs.astype(np.float64)))) < 1e-4
