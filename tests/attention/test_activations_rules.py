"""fuse-activations, per rule: a match (shared record, tag, ORT), a non-match with the tracer's
reason, and an intermediate value with another consumer.

Rules are counted and recorded under their family name (``bias-gelu``); the nodes keep the
variant that made them (``bias-gelu-1``), as before the rules joined the shared record.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from onnx import helper

from txcompile.passes.attention.activations import FuseActivations

from .graphs import max_diff, op_types, run_pass
from .test_activations import FEEDS, WIDTH, _model, bias_gelu, erf_gelu, quick_gelu, tanh_gelu

# the rewriter copies the replaced node's metadata and a tag is set only once: FastGelu(x, b)
# keeps the name of the rule that made FastGelu(x + b)
FIRST_TAG = {"fast-gelu-bias": "gelu-tanh-onnx"}
SHARED = "Matched nodes have other uses preventing replacement."


def onnxscript_tanh_gelu(cube=0.044715, extra_output=None):
    """The tanh formula in onnxscript's order: x · (0.5 · (tanh(c · (x + 0.044715 · x³)) + 1))."""
    nodes = [
        helper.make_node("Pow", ["x", "three"], ["cubed"]),
        helper.make_node("Mul", ["cube", "cubed"], ["cube_term"]),
        helper.make_node("Add", ["x", "cube_term"], ["inner"]),
        helper.make_node("Mul", ["outer", "inner"], ["tanh_in"]),
        helper.make_node("Tanh", ["tanh_in"], ["tanh"]),
        helper.make_node("Add", ["tanh", "one"], ["shifted"]),
        helper.make_node("Mul", ["half", "shifted"], ["halved"]),
        helper.make_node("Mul", ["x", "halved"], ["y"]),
    ]
    constants = {"three": 3.0, "cube": cube, "outer": math.sqrt(2 / math.pi), "half": 0.5, "one": 1.0}
    return _model(nodes, constants, extra_output)


def onnx_tanh_gelu(approximate="tanh", bias_shape=None, extra_output=None):
    """Dynamo's gelu_new: ONNX Gelu(approximate="tanh"), with a bias Add in front when asked."""
    source, nodes, constants = "x", [], {}
    if bias_shape is not None:
        constants["bias"] = np.linspace(-1, 1, math.prod(bias_shape)).reshape(bias_shape)
        nodes.append(helper.make_node("Add", ["x", "bias"], ["biased"]))
        source = "biased"
    nodes.append(helper.make_node("Gelu", [source], ["y"], approximate=approximate))
    if extra_output == "y2":  # the output itself read twice: nothing inside the pattern is shared
        nodes[-1].output[0] = "gelu"
        nodes += [helper.make_node("Neg", ["gelu"], ["y"]), helper.make_node("Abs", ["gelu"], ["y2"])]
    return _model(nodes, constants, extra_output)


CASES = {
    # rule: (builder, op it becomes, arguments that break it, its reason, an intermediate to share)
    "gelu-erf": (
        erf_gelu,
        "Gelu",
        {"divisor": 2.0},
        "Constant value mismatch: expected 1.4142135623730951, got 2.0.",
        "erf",
    ),
    "gelu-tanh": (
        onnxscript_tanh_gelu,
        "FastGelu",
        {"cube": 0.04},
        "Constant value mismatch: expected 0.044715, got 0.03999999910593033.",
        "tanh",
    ),
    "gelu-tanh-onnx": (
        onnx_tanh_gelu,
        "FastGelu",
        {"approximate": "none"},
        "exact Gelu: BiasGelu/Gelu handle it",
        None,
    ),
    "gelu-tanh-half": (
        tanh_gelu,
        "FastGelu",
        {"cube": 0.04},
        "cube constant is 0.03999999910593033, not 0.044715",
        "tanh",
    ),
    "bias-gelu": (
        bias_gelu,
        "BiasGelu",
        {"bias_shape": (1, WIDTH)},
        "bias is not of shape 1D tensor",
        "biased",
    ),
    "fast-gelu-bias": (
        lambda **kw: onnx_tanh_gelu(**{"bias_shape": (WIDTH,), **kw}),
        "FastGelu",
        {"bias_shape": (1, WIDTH)},
        "bias is not a 1-D constant",
        "biased",
    ),
    "quick-gelu": (quick_gelu, "QuickGelu", {"alpha": 1.0}, "alpha 1 is SiLU, not QuickGelu", "gate"),
}


def _sites(tx_pass, rule: str, status: str) -> list[dict]:
    return [s for s in tx_pass.details["sites"] if s["rule"] == rule and s["status"] == status]


@pytest.mark.parametrize("rule", CASES)
def test_match_is_a_fused_record_and_the_nodes_carry_the_variant(rule):
    build, op, _, _, _ = CASES[rule]
    model = build()
    tx_pass, fused = run_pass(FuseActivations, model, context_feeds=FEEDS)
    assert tx_pass.rule_counts[rule] == 1
    (site,) = _sites(tx_pass, rule, "fused")
    assert set(site) == {"site", "rule", "status", "op", "reason"}
    assert (site["op"], site["reason"]) == (f"com.microsoft.{op}", None)
    node = next(n for n in fused.graph.node if n.op_type == op and n.domain == "com.microsoft")
    tag = {p.key: p.value for p in node.metadata_props}["txcompile.rule"]
    first = FIRST_TAG.get(rule, rule)
    assert tag == first or (tag.startswith(f"{first}-") and tag.rpartition("-")[2].isdigit())
    assert max_diff(model, fused, FEEDS) < 1e-4
    read = {i for n in fused.graph.node for i in n.input}
    assert [t.name for t in fused.graph.initializer if t.name not in read] == []  # constants go too


@pytest.mark.parametrize("rule", CASES)
def test_non_match_is_recorded_with_the_tracer_reason(rule):
    build, op, broken, reason, _ = CASES[rule]
    model = build(**broken)
    tx_pass, fused = run_pass(FuseActivations, model, context_feeds=FEEDS)
    assert not _sites(tx_pass, rule, "fused") and rule not in tx_pass.rule_counts
    assert [s["reason"] for s in _sites(tx_pass, rule, "unfused")] == [reason]
    assert tx_pass.details["unfused"] >= 1
    assert max_diff(model, fused, FEEDS) < 1e-4


@pytest.mark.parametrize("rule", [r for r, case in CASES.items() if case[4] is not None])
def test_shared_intermediate_is_refused_with_the_reason(rule):
    build, op, _, _, shared = CASES[rule]
    model = build(extra_output=shared)
    tx_pass, fused = run_pass(FuseActivations, model, context_feeds=FEEDS)
    assert rule not in tx_pass.rule_counts
    assert [s["reason"] for s in _sites(tx_pass, rule, "unfused")] == [SHARED]
    assert max_diff(model, fused, FEEDS) < 1e-4


def test_single_node_rule_keeps_an_output_read_twice():
    """gelu-tanh-onnx has no intermediate: an output with two readers is rewritten for both."""
    model = onnx_tanh_gelu(extra_output="y2")
    tx_pass, fused = run_pass(FuseActivations, model, context_feeds=FEEDS)
    assert tx_pass.rule_counts == {"gelu-tanh-onnx": 1}
    assert {"Neg", "Abs", "FastGelu"} <= set(op_types(fused)) and "Gelu" not in op_types(fused)
    assert max_diff(model, fused, FEEDS) < 1e-4


# --- gelu-by-value: the arrangements no pattern lists -------------------------------------------


def bloom_gelu(scale=0.79788456, extra_output=None):
    """BLOOM's bloom_gelu_forward: x · 0.5 · (1 + tanh(0.79788456 · x · (1 + 0.044715 · x · x)))."""
    nodes = [
        helper.make_node("Mul", ["x", "half"], ["half_x"]),
        helper.make_node("Mul", ["scale", "x"], ["scaled"]),
        helper.make_node("Mul", ["cube", "x"], ["cube_x"]),
        helper.make_node("Mul", ["cube_x", "x"], ["cube_xx"]),
        helper.make_node("Add", ["one", "cube_xx"], ["poly"]),
        helper.make_node("Mul", ["scaled", "poly"], ["inner"]),
        helper.make_node("Tanh", ["inner"], ["tanh"]),
        helper.make_node("Add", ["one", "tanh"], ["shifted"]),
        helper.make_node("Mul", ["half_x", "shifted"], ["y"]),
    ]
    return _model(nodes, {"half": 0.5, "scale": scale, "cube": 0.044715, "one": 1.0}, extra_output)


def torchscript_tanh_gelu(extra_output=None):
    """gelu(approximate="tanh") as TorchScript writes it below opset 20: ½·(x·(1 + tanh(β·(x + κx³))))."""
    nodes = [
        helper.make_node("Mul", ["x", "x"], ["xx"]),
        helper.make_node("Mul", ["x", "xx"], ["xxx"]),
        helper.make_node("Mul", ["kappa", "xxx"], ["cube_term"]),
        helper.make_node("Add", ["x", "cube_term"], ["sum"]),
        helper.make_node("Mul", ["beta", "sum"], ["inner"]),
        helper.make_node("Tanh", ["inner"], ["tanh"]),
        helper.make_node("Add", ["one", "tanh"], ["shifted"]),
        helper.make_node("Mul", ["x", "shifted"], ["product"]),
        helper.make_node("Mul", ["half", "product"], ["y"]),
    ]
    constants = {"kappa": 0.044715, "beta": math.sqrt(2 / math.pi), "one": 1.0, "half": 0.5}
    return _model(nodes, constants, extra_output, opset=18)


def soft_cap(extra_output=None):
    """Gemma 2's logit soft-capping, 30 · tanh(x / 30): a Tanh that is no GELU."""
    nodes = [
        helper.make_node("Div", ["x", "cap"], ["scaled"]),
        helper.make_node("Tanh", ["scaled"], ["tanh"]),
        helper.make_node("Mul", ["tanh", "cap"], ["y"]),
    ]
    return _model(nodes, {"cap": 30.0}, extra_output)


@pytest.mark.parametrize("build", [bloom_gelu, torchscript_tanh_gelu])
def test_gelu_by_value_fuses_an_arrangement_no_pattern_lists(build):
    model = build()
    tx_pass, fused = run_pass(FuseActivations, model, context_feeds=FEEDS)
    assert tx_pass.rule_counts == {"gelu-by-value": 1}
    (site,) = _sites(tx_pass, "gelu-by-value", "fused")
    assert (site["op"], site["form"], site["reason"]) == ("com.microsoft.FastGelu", "tanh", None)
    assert op_types(fused) == ["FastGelu"]
    tag = {p.key: p.value for p in fused.graph.node[0].metadata_props}["txcompile.rule"]
    assert tag == "gelu-by-value"
    assert max_diff(model, fused, FEEDS) < 1e-5
    assert list(fused.graph.initializer) == []  # the formula's constants go with it


def test_gelu_by_value_names_how_far_a_tanh_is_from_gelu():
    tx_pass, fused = run_pass(FuseActivations, soft_cap(), context_feeds=FEEDS)
    assert not tx_pass.rule_counts and "Tanh" in op_types(fused)
    (site,) = _sites(tx_pass, "gelu-by-value", "unfused")
    assert site["reason"] == "the elementwise region around it is not GELU (max diff 30 from erf-GELU)"
    _, off = run_pass(FuseActivations, bloom_gelu(scale=0.7), context_feeds=FEEDS)
    assert "FastGelu" not in op_types(off)  # a constant a little off is not GELU either


def test_gelu_by_value_refuses_a_formula_value_read_elsewhere():
    model = bloom_gelu(extra_output="poly")
    tx_pass, fused = run_pass(FuseActivations, model, context_feeds=FEEDS)
    assert not tx_pass.rule_counts
    (site,) = _sites(tx_pass, "gelu-by-value", "unfused")
    assert site["reason"] == "poly inside the GELU formula has another reader"
    assert max_diff(model, fused, FEEDS) < 1e-5
