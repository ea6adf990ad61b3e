"""Per rule: a positive case, a negative case, and a shared intermediate that must not be folded."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper

from txcompile.graph.ckks import CONTRACT
from txcompile.graph.depth import node_levels
from txcompile.graph.errors import TxError

from .graphs import HIDDEN, linear, model, op_types, out, polynomial, weight, x_input


def _elementwise(op: str, **attrs):
    nodes, inits = linear("l", "x", "h")
    nodes.append(helper.make_node(op, ["h"], ["y"], name=f"the_{op.lower()}", **attrs))
    return model(nodes, [x_input()], [out("y")], inits)


@pytest.mark.parametrize("op", ["Gelu", "Tanh", "Sigmoid", "Erf"])
def test_elementwise_becomes_polynomial(op):
    result, record = polynomial(_elementwise(op))
    assert record.status == "applied"
    assert op_types(result.model) <= CONTRACT
    site = record.details["sites"][0]
    assert site["prescale_folded"] and site["max_error"] <= 1e-3 and site["depth"] <= 6
    assert record.max_diff < 5e-3


def test_gelu_tanh_form():
    result, record = polynomial(_elementwise("Gelu", approximate="tanh"))
    assert record.details["sites"][0]["rule"] == "gelu-tanh-chebyshev"
    assert record.max_diff < 5e-3


def test_plaintext_nonlinearity_is_left_to_the_client():
    """Negative: a Sigmoid of a constant-only value is plaintext, not rewritten."""
    nodes = [
        helper.make_node("Sigmoid", ["c"], ["s"], name="plain_sigmoid"),
        helper.make_node("Mul", ["x", "s"], ["y"], name="scale"),
    ]
    proto = model(nodes, [x_input()], [out("y")], [weight("c", (HIDDEN,))])
    result, record = polynomial(proto)
    assert record.status == "unchanged"
    assert "Sigmoid" in op_types(result.model)
    assert result.records[1].status == "unchanged"  # the contract holds: Sigmoid sees plaintext only


def test_shared_linear_output_is_not_folded():
    """The linear output also feeds a graph output: scaling its weights would change it."""
    nodes, inits = linear("l", "x", "h")
    nodes.append(helper.make_node("Gelu", ["h"], ["y"], name="gelu"))
    proto = model(nodes, [x_input()], [out("y"), out("h")], inits)
    result, record = polynomial(proto)
    site = record.details["sites"][0]
    assert not site["prescale_folded"]
    assert record.max_diff < 5e-3  # h unchanged, y approximated


def _attention(mask: bool, sharpen: float = 1.0):
    nodes, inits = linear("q", "x", "q")
    k_nodes, k_inits = linear("k", "x", "k")
    nodes += k_nodes
    inits += k_inits
    nodes += [
        helper.make_node("Transpose", ["k"], ["kt"], perm=[0, 2, 1], name="kt"),
        helper.make_node("MatMul", ["q", "kt"], ["qk"], name="qk"),
        helper.make_node("Div", ["qk", "sqrt_d"], ["scores"], name="scale"),
    ]
    inits.append(helper.make_tensor("sqrt_d", TensorProto.FLOAT, [], [float(np.sqrt(HIDDEN)) / sharpen]))
    inputs = [x_input()]
    if mask:
        inputs.append(helper.make_tensor_value_info("mask", TensorProto.INT64, [2, 4]))
        nodes += [
            helper.make_node("Cast", ["mask"], ["maskf"], to=TensorProto.FLOAT, name="cast"),
            helper.make_node("Unsqueeze", ["maskf", "axis1"], ["mask3"], name="unsq"),
            helper.make_node("Sub", ["one", "mask3"], ["inv"], name="inv"),
            helper.make_node("Mul", ["inv", "neg_big"], ["bias"], name="bias"),
            helper.make_node("Add", ["scores", "bias"], ["masked"], name="add_mask"),
        ]
        inits += [
            helper.make_tensor("axis1", TensorProto.INT64, [1], [1]),
            helper.make_tensor("one", TensorProto.FLOAT, [], [1.0]),
            helper.make_tensor("neg_big", TensorProto.FLOAT, [], [-3.0e38]),
        ]
    nodes.append(helper.make_node("Softmax", ["masked" if mask else "scores"], ["y"], axis=-1, name="sm"))
    return model(nodes, inputs, [out("y", (2, 4, 4))], inits)


def _levels(proto) -> dict[str, int]:
    """Ciphertext level of every named value, as the depth report counts it."""
    levels, _ = node_levels(ir.serde.deserialize_model(proto).graph)
    return {v.name: level for v, level in levels.items() if v.name}


def _graph_depth(before, after, site_input: str, output: str = "y") -> int:
    """Levels the emitted graph spends between the site's input and the output."""
    return _levels(after)[output] - _levels(before)[site_input]


@pytest.mark.parametrize("mask", [False, True], ids=["plain", "padding-mask"])
def test_softmax_exp_newton(mask):
    proto = _attention(mask)
    result, record = polynomial(proto)
    assert record.status == "applied"
    site = record.details["sites"][0]
    assert site["rule"] == "softmax-exp-newton" and site["masked"] is mask
    # scores within ±4 (±5.6 with the margin): the reciprocal covers every row sum that domain
    # allows (~100×); 14 levels before the depth-optimal evaluation, Goldschmidt steps and the
    # exp absorbed into the last one
    assert site["max_error"] <= 1e-3 and site["depth"] <= 12 and site["squarings"] == 0
    assert _graph_depth(proto, result.model, "masked" if mask else "scores") == site["depth"]
    assert record.max_diff < 2e-3
    assert result.records[1].status == "unchanged"  # contract holds


def test_unmasked_softmax_centers_without_a_level():
    """x/(n·half) is folded into the scores' producer beside x/half: the row mean is a free sum.
    A padding mask's per-row weights keep_j/n_valid cannot ride on a weight: one level."""
    plain = polynomial(_attention(False))[1].details["sites"][0]
    masked = polynomial(_attention(True))[1].details["sites"][0]
    assert plain["centering_levels"] == 0 and masked["centering_levels"] == 1
    assert plain["depth"] == masked["depth"] - 1 == 11


def test_softmax_without_linear_producer_prescales_in_parallel():
    """Negative: scores straight from the graph input cannot fold; x/half and x/(n·half) are two
    multiplies side by side, so centering still adds nothing beyond the pre-scaling level."""
    nodes = [helper.make_node("Softmax", ["x"], ["y"], axis=-1, name="sm")]
    proto = model(nodes, [x_input()], [out("y")])
    result, record = polynomial(proto)
    site = record.details["sites"][0]
    assert not site["prescale_folded"] and site["centering_levels"] == 1
    assert _levels(result.model)["y"] == site["depth"]
    assert site["max_error"] <= 1e-3 and record.max_diff < 2e-3


def test_wide_softmax_rows_normalize_and_square():
    """Scores spanning ~100 units: no single exp polynomial + reciprocal covers them."""
    proto = _attention(True, sharpen=20.0)
    result, record = polynomial(proto)
    site = record.details["sites"][0]
    assert site["domain"][1] - site["domain"][0] > 60
    assert site["squarings"] >= 1 and site["square_reciprocal"]["max_error"] <= 1e-3
    assert site["max_error"] <= 1e-3 and record.max_diff < 2e-3
    assert result.records[1].status == "unchanged"
    # the reciprocals before a squaring only bound the next domain: their row factor cancels
    coarse = site["coarse_error"]
    assert site["reciprocal"]["max_error"] <= coarse
    assert site["intermediate_reciprocal"]["max_error"] <= coarse
    assert _graph_depth(proto, result.model, "masked") == site["depth"] <= 30  # 43 with full-tol ones


def test_power_softmax_reports_its_cost():
    result, record = polynomial(_attention(True), he_mode="power-softmax")
    site = record.details["sites"][0]
    assert site["rule"] == "power-softmax" and site["power"] == 4
    assert site["accuracy_cost_vs_softmax"] > 0
    assert "Pow" in op_types(result.model)


def _layernorm(shared: bool):
    nodes = [helper.make_node("LayerNormalization", ["x", "g", "b"], ["y"], epsilon=1e-5, name="ln")]
    outputs = [out("y")]
    if shared:
        outputs.append(out("x2"))
        nodes.append(helper.make_node("Add", ["x", "x"], ["x2"], name="other_user"))
    inits = [weight("g", (HIDDEN,), 0.1), weight("b", (HIDDEN,), 0.1)]
    inits[0].float_data[:] = []
    return model(nodes, [x_input()], outputs, inits)


@pytest.mark.parametrize("shared", [False, True], ids=["alone", "input-shared"])
def test_layernorm_newton(shared):
    result, record = polynomial(_layernorm(shared))
    site = record.details["sites"][0]
    assert site["rule"] == "layernorm-newton-isqrt" and site["depth"] <= 10
    assert "LayerNormalization" not in op_types(result.model)
    assert record.max_diff < 5e-3


def _rmsnorm(div: bool):
    nodes = [
        helper.make_node("Pow", ["x", "two"], ["sq"], name="sq"),
        helper.make_node("ReduceMean", ["sq", "axes"], ["ms"], keepdims=1, name="ms"),
        helper.make_node("Add", ["ms", "eps"], ["v"], name="eps_add"),
        helper.make_node("Sqrt", ["v"], ["rt"], name="sqrt"),
    ]
    if div:
        nodes.append(helper.make_node("Div", ["x", "rt"], ["y"], name="div"))
    else:
        nodes += [
            helper.make_node("Reciprocal", ["rt"], ["r"], name="recip"),
            helper.make_node("Mul", ["x", "r"], ["y"], name="mul"),
        ]
    inits = [
        helper.make_tensor("two", TensorProto.FLOAT, [], [2.0]),
        helper.make_tensor("axes", TensorProto.INT64, [1], [-1]),
        helper.make_tensor("eps", TensorProto.FLOAT, [], [1e-6]),
    ]
    return model(nodes, [x_input()], [out("y")], inits)


def _layernorm_of(nodes, inits, source: str, outputs=()):
    norm = helper.make_node("LayerNormalization", [source, "ln.g", "ln.b"], ["y"], epsilon=1e-5, name="ln")
    nodes = [*nodes, norm]
    inits = [*inits, weight("ln.g", (HIDDEN,), 0.1), weight("ln.b", (HIDDEN,), 0.1)]
    return model(nodes, [x_input()], [out("y"), *(out(o) for o in outputs)], inits)


@pytest.mark.parametrize("shared", [False, True], ids=["alone", "producer-shared"])
def test_layernorm_centering_folds_into_linear_producer(shared):
    """√s·h and √s·h/n come out of two copies of h's linear layer: d' costs no level. When h
    also feeds an output, its weights cannot change: centering pays its level."""
    nodes, inits = linear("l", "x", "h")
    proto = _layernorm_of(nodes, inits, "h", ["h"] if shared else [])
    result, record = polynomial(proto)
    site = record.details["sites"][0]
    assert site["centering_levels"] == (1 if shared else 0)
    assert _graph_depth(proto, result.model, "h") == site["depth"]
    assert site["depth"] == (7 if shared else 6)  # 8 when the square root was a separate product
    assert record.max_diff < 5e-3


def _weight_matmuls(proto) -> list[tuple[int, ...]]:
    """Shapes of the constant weights that MatMuls multiply by."""
    shapes = {i.name: tuple(i.dims) for i in proto.graph.initializer}
    matmuls = [n for n in proto.graph.node if n.op_type == "MatMul" and n.input[1] in shapes]
    return sorted(shapes[n.input[1]] for n in matmuls)


def test_layernorm_mean_is_a_column_of_the_weights():
    """√s·mean(h) = h·(√s/n·W·1) + √s/n·Σb: the mean costs a [K, 1] column, not a layer copy."""
    nodes, inits = linear("l", "x", "h")
    result, record = polynomial(_layernorm_of(nodes, inits, "h"))
    assert record.details["sites"][0]["centering_levels"] == 0
    assert _weight_matmuls(result.model) == [(HIDDEN, 1), (HIDDEN, HIDDEN)]  # √s·W replaces W
    assert record.max_diff < 5e-3


def test_broadcast_bias_keeps_the_layer_copy():
    """Negative: a bias broadcast along the summed axis would count n times, so the mean comes
    from a second folded copy of the layer instead (still no level)."""
    nodes, inits = linear("l", "x", "h")
    inits[1] = weight("l.b", (1,), 0.1)
    result, record = polynomial(_layernorm_of(nodes, inits, "h"))
    assert record.details["sites"][0]["centering_levels"] == 0
    assert _weight_matmuls(result.model) == [(HIDDEN, HIDDEN), (HIDDEN, HIDDEN)]
    assert record.max_diff < 5e-3


@pytest.mark.parametrize("deep", [False, True], ids=["shallow-residual", "deep-residual"])
def test_layernorm_residual_with_other_users(deep):
    """z = dense + r with r also a graph output: r cannot fold, but when it is at least a level
    shallower than z, r·c stays within z's level, so the copy is still free. A residual as deep
    as z would make the copy deeper: then centering pays its level."""
    nodes, inits = linear("a", "x", "h")
    more, more_inits = linear("d", "g", "dense")
    res, res_inits = linear("r", "x", "r")
    nodes += [helper.make_node("Mul", ["h", "h"], ["g"], name="square"), *more, *res]
    residual = "r"
    if deep:
        nodes += [
            helper.make_node("Mul", ["r", "r"], ["r2"], name="r2"),
            helper.make_node("Mul", ["r2", "r"], ["r3"], name="r3"),
        ]
        residual = "r3"
    nodes.append(helper.make_node("Add", ["dense", residual], ["z"], name="residual_add"))
    proto = _layernorm_of(nodes, inits + more_inits + res_inits, "z", [residual])
    result, record = polynomial(proto)
    site = record.details["sites"][0]
    assert site["centering_levels"] == (1 if deep else 0)
    assert _graph_depth(proto, result.model, "z") == site["depth"]
    assert record.max_diff < 5e-3


def test_layernorm_of_token_lookup_folds_into_the_table():
    """The client encrypts the embedding rows it looks up: it can look them up pre-scaled."""
    ids = helper.make_tensor_value_info("ids", TensorProto.INT64, [2, 4])
    nodes = [
        helper.make_node("Gather", ["table", "ids"], ["emb"], name="lookup"),
        helper.make_node("LayerNormalization", ["emb", "g", "b"], ["y"], epsilon=1e-5, name="ln"),
    ]
    inits = [weight("table", (6, HIDDEN)), weight("g", (HIDDEN,), 0.1), weight("b", (HIDDEN,), 0.1)]
    proto = model(nodes, [ids], [out("y")], inits)
    result, record = polynomial(proto)
    site = record.details["sites"][0]
    assert site["centering_levels"] == 0
    assert _levels(result.model)["y"] == site["depth"]
    assert record.max_diff < 5e-3


def test_prescale_does_not_fold_into_a_free_integer():
    """h·2 costs no level (additions); folding 1/half into the 2 would make it cost one, so the
    pre-scaling folds into h's linear layer instead, and the reported depth is the graph's."""
    nodes, inits = linear("l", "x", "h")
    nodes += [
        helper.make_node("Mul", ["h", "two"], ["h2"], name="double"),
        helper.make_node("Gelu", ["h2"], ["y"], name="gelu"),
    ]
    inits.append(helper.make_tensor("two", TensorProto.FLOAT, [], [2.0]))
    proto = model(nodes, [x_input()], [out("y")], inits)
    result, record = polynomial(proto)
    site = record.details["sites"][0]
    assert site["prescale_folded"]
    assert _graph_depth(proto, result.model, "h2") == site["depth"]
    assert record.max_diff < 5e-3


@pytest.mark.parametrize("div", [False, True], ids=["reciprocal-sqrt", "div-sqrt"])
def test_rmsnorm_inverse_sqrt(div):
    result, record = polynomial(_rmsnorm(div))
    site = record.details["sites"][0]
    assert site["rule"] == "invsqrt-newton" and site["relative"]
    assert not ({"Sqrt", "Reciprocal", "Div"} & op_types(result.model))
    assert record.max_diff < 5e-3


def test_sqrt_with_another_user_stays_a_sqrt_site():
    """The Sqrt also feeds an output, so it is not merged into the reciprocal."""
    proto = _rmsnorm(False)
    proto.graph.output.append(out("rt", (2, 4, 1)))
    result, record = polynomial(proto)
    rules = sorted(s["rule"] for s in record.details["sites"])
    assert rules == ["reciprocal-newton", "sqrt-newton"]
    assert record.max_diff < 5e-3


def test_bad_mode_is_one_line_error():
    with pytest.raises(TxError, match="--he-mode"):
        polynomial(_elementwise("Gelu"), he_mode="exact")
