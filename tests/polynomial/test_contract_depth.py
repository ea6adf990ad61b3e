"""The HE contract (loud failure, naming op and node) and the depth accounting conventions."""

from __future__ import annotations

import onnx_ir as ir
import pytest
from onnx import TensorProto, helper

from txcompile.graph.ckks import violations
from txcompile.graph.depth import depth_report, suggest_ckks
from txcompile.graph.errors import TxError

from .graphs import linear, model, out, polynomial, weight, x_input


def test_relu_on_ciphertext_fails_loudly_with_op_and_node():
    nodes, inits = linear("l", "x", "h")
    nodes.append(helper.make_node("Relu", ["h"], ["y"], name="the_relu"))
    with pytest.raises(TxError, match="Relu node 'the_relu'"):
        polynomial(model(nodes, [x_input()], [out("y")], inits))


def test_plaintext_mask_ops_are_client_side():
    """Where/Cast/Equal on the mask input touch no ciphertext: allowed."""
    nodes = [
        helper.make_node("Cast", ["mask"], ["m"], to=TensorProto.FLOAT, name="cast"),
        helper.make_node("Unsqueeze", ["m", "ax"], ["m3"], name="unsq"),
        helper.make_node("Mul", ["x", "m3"], ["y"], name="apply"),
    ]
    mask = helper.make_tensor_value_info("mask", TensorProto.INT64, [2, 4])
    proto = model(
        nodes, [x_input(), mask], [out("y")], [helper.make_tensor("ax", TensorProto.INT64, [1], [2])]
    )
    assert violations(ir.serde.deserialize_model(proto).graph) == []


def test_non_integer_pow_is_a_violation():
    nodes = [helper.make_node("Pow", ["x", "half"], ["y"], name="root")]
    proto = model(nodes, [x_input()], [out("y")], [helper.make_tensor("half", TensorProto.FLOAT, [], [0.5])])
    problems = violations(ir.serde.deserialize_model(proto).graph)
    assert problems and "Pow node 'root'" in problems[0]


def _chain():
    """x·W (ct×pt, 1) → square (ct×ct, 1) → ×2 (integer, 0) → +b (0) → ReduceMean (1) → Pow 4 (2)."""
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["a"], name="mm"),
        helper.make_node("Mul", ["a", "a"], ["sq"], name="square"),
        helper.make_node("Mul", ["sq", "two"], ["d"], name="double"),
        helper.make_node("Add", ["d", "b"], ["e"], name="bias"),
        helper.make_node("ReduceMean", ["e", "axes"], ["m"], keepdims=1, name="mean"),
        helper.make_node("Pow", ["m", "four"], ["y"], name="pow4"),
    ]
    inits = [
        weight("w", (8, 8)),
        weight("b", (8,)),
        helper.make_tensor("two", TensorProto.FLOAT, [], [2.0]),
        helper.make_tensor("four", TensorProto.INT64, [], [4]),
        helper.make_tensor("axes", TensorProto.INT64, [1], [-1]),
    ]
    return ir.serde.deserialize_model(model(nodes, [x_input()], [out("y", (2, 4, 1))], inits))


def test_depth_conventions():
    report = depth_report(_chain())
    assert report["depth"] == 5
    levels = {name: entry["level"] for name, entry in report["nodes"].items()}
    assert levels == {"mm": 1, "square": 2, "double": 2, "bias": 2, "mean": 3, "pow4": 5}
    assert report["multiplications"] == {"ct×ct": 2, "ct×pt": 2}
    assert [step["node"] for step in report["critical_path"]][-1] == "pow4"
    assert report["ckks"]["poly_modulus_degree"] == 16384


def test_budget_reports_where_bootstrapping_is_needed():
    report = depth_report(_chain(), budget=2)
    assert report["bootstrapping"]["needed"]
    assert report["bootstrapping"]["first_refresh_before"] == ["mean"]
    assert "bootstrapping" not in depth_report(_chain(), budget=5)


def test_ckks_suggestion_grows_with_depth():
    assert suggest_ckks(2)["poly_modulus_degree"] == 8192
    assert suggest_ckks(7)["poly_modulus_degree"] == 16384
    assert suggest_ckks(8)["poly_modulus_degree"] == 32768  # 440 bits > 438
    assert suggest_ckks(8, scale_bits=30)["poly_modulus_degree"] == 16384
    assert suggest_ckks(40) is None
