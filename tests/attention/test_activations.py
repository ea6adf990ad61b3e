"""fuse-activations per rule: a positive case, a negative case, and a shared intermediate."""

from __future__ import annotations

import math

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from txcompile.passes.attention.activations import FuseActivations

from .graphs import max_diff, op_types, run_pass

WIDTH = 16


def _model(nodes, constants: dict, extra_output: str | None = None, opset: int = 20) -> onnx.ModelProto:
    inits = [numpy_helper.from_array(np.asarray(v, np.float32), k) for k, v in constants.items()]
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", WIDTH])]
    if extra_output:
        outputs.append(helper.make_tensor_value_info(extra_output, TensorProto.FLOAT, ["batch", WIDTH]))
    graph = helper.make_graph(
        nodes,
        "act",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", WIDTH])],
        outputs,
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 9
    onnx.checker.check_model(model)
    return model


SQRT2 = math.sqrt(2)


def erf_gelu(divisor=SQRT2, extra_output=None):
    """TorchScript's exact GELU: 0.5 · (x · (erf(x / √2) + 1))."""
    nodes = [
        helper.make_node("Div", ["x", "divisor"], ["scaled"]),
        helper.make_node("Erf", ["scaled"], ["erf"]),
        helper.make_node("Add", ["erf", "one"], ["shifted"]),
        helper.make_node("Mul", ["x", "shifted"], ["product"]),
        helper.make_node("Mul", ["product", "half"], ["y"]),
    ]
    return _model(nodes, {"divisor": divisor, "one": 1.0, "half": 0.5}, extra_output)


def tanh_gelu(cube=0.044715, extra_output=None):
    """GPT-2's gelu_new as TorchScript writes it: (0.5 · x) · (1 + tanh(c · (x + 0.044715 · x³)))."""
    nodes = [
        helper.make_node("Pow", ["x", "three"], ["cubed"]),
        helper.make_node("Mul", ["cube", "cubed"], ["cube_term"]),
        helper.make_node("Add", ["x", "cube_term"], ["inner"]),
        helper.make_node("Mul", ["inner", "outer"], ["tanh_in"]),
        helper.make_node("Tanh", ["tanh_in"], ["tanh"]),
        helper.make_node("Mul", ["half", "x"], ["half_x"]),
        helper.make_node("Add", ["tanh", "one"], ["shifted"]),
        helper.make_node("Mul", ["half_x", "shifted"], ["y"]),
    ]
    constants = {"three": 3.0, "cube": cube, "outer": math.sqrt(2 / math.pi), "half": 0.5, "one": 1.0}
    return _model(nodes, constants, extra_output)


def bias_gelu(bias_shape=(WIDTH,), extra_output=None):
    """Dynamo's Linear + ONNX Gelu: Gelu(x + b)."""
    nodes = [helper.make_node("Add", ["x", "bias"], ["biased"]), helper.make_node("Gelu", ["biased"], ["y"])]
    return _model(
        nodes, {"bias": np.linspace(-1, 1, math.prod(bias_shape)).reshape(bias_shape)}, extra_output
    )


def quick_gelu(alpha=1.702, extra_output=None):
    """CLIP's quick_gelu: x · sigmoid(1.702 · x)."""
    nodes = [
        helper.make_node("Mul", ["x", "alpha"], ["scaled"]),
        helper.make_node("Sigmoid", ["scaled"], ["gate"]),
        helper.make_node("Mul", ["x", "gate"], ["y"]),
    ]
    return _model(nodes, {"alpha": alpha}, extra_output)


CASES = {
    # rule: (builder, op it becomes, arguments that break the formula, an intermediate to share)
    "gelu-erf": (erf_gelu, "Gelu", {"divisor": 2.0}, "erf"),
    "gelu-tanh-half": (tanh_gelu, "FastGelu", {"cube": 0.04}, "tanh"),
    "bias-gelu": (bias_gelu, "BiasGelu", {"bias_shape": (2, WIDTH)}, "biased"),
    "quick-gelu": (quick_gelu, "QuickGelu", {"alpha": 1.0}, "gate"),
}
FEEDS = {"x": np.random.default_rng(0).standard_normal((3, WIDTH)).astype(np.float32) * 3}


@pytest.mark.parametrize("rule", CASES)
def test_positive(rule):
    build, op, _, _ = CASES[rule]
    model = build()
    tx_pass, fused = run_pass(FuseActivations, model, context_feeds=FEEDS)
    assert op in op_types(fused)
    assert tx_pass.rule_counts[rule] == 1
    assert max_diff(model, fused, FEEDS) < 1e-4
    assert all(n.domain == "com.microsoft" for n in fused.graph.node if n.op_type == op)


@pytest.mark.parametrize("rule", CASES)
def test_negative(rule):
    build, op, broken, _ = CASES[rule]
    tx_pass, fused = run_pass(FuseActivations, build(**broken), context_feeds=FEEDS)
    assert op not in op_types(fused)
    assert not tx_pass.rule_counts


@pytest.mark.parametrize("rule", CASES)
def test_shared_intermediate_is_not_fused(rule):
    build, op, _, shared = CASES[rule]
    tx_pass, fused = run_pass(FuseActivations, build(extra_output=shared), context_feeds=FEEDS)
    assert op not in op_types(fused)
    assert not tx_pass.rule_counts
