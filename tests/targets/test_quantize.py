"""quantize: dynamic int8 / int4 weight-only MatMuls, with measured error and fp32 fallbacks."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import helper, numpy_helper

from txcompile.cli import main
from txcompile.errors import TxError
from txcompile.passes.base import PassContext
from txcompile.passes.quantize import Quantize, cosine, quantizable_matmuls, sensitivity
from txcompile.runtime import session as rt

from .graphs import linear_block, make, tensor, weight

FEEDS = {"x": np.random.default_rng(0).standard_normal((8, 16)).astype(np.float32)}


def quantize(model, feeds=FEEDS, **options):
    tx_pass = Quantize(PassContext("cpu", "cpu", feeds, {"precision": "int8", **options}))
    working = ir.serde.deserialize_model(model)
    result = tx_pass(working)
    out = ir.serde.serialize_model(working)
    return tx_pass, result, out


def op_counts(model: onnx.ModelProto) -> dict[str, int]:
    counts: dict[str, int] = {}
    for node in model.graph.node:
        counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return counts


def test_int8_quantizes_constant_weights_and_reports_error():
    tx_pass, result, out = quantize(linear_block())
    assert result.modified and tx_pass.rule_counts["int8-matmul"] == 2
    ops = op_counts(out)
    assert ops["MatMulInteger"] == 2 and "MatMul" not in ops
    # 16 features, 7-bit per-column weights, a LayerNorm that rescales the error: a loose bound
    assert tx_pass.details["cosine"] > 0.93 and 0 < tx_pass.details["max_abs_error"] < 1.0
    got = rt.run(rt.create_session(out), FEEDS)
    assert cosine(rt.run(rt.create_session(linear_block()), FEEDS), got) == pytest.approx(
        tx_pass.details["cosine"]
    )


def test_activation_times_activation_is_left_alone():
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["h"], name="mm_weight"),
        helper.make_node("MatMul", ["h", "xt"], ["y"], name="mm_activations"),
    ]
    model = make(
        nodes,
        [tensor("x", [8, 16]), tensor("xt", [16, 8])],
        [tensor("y", [8, 8])],
        [weight("w", (16, 16))],
    )
    assert quantizable_matmuls(model) == ["mm_weight"]
    feeds = {**FEEDS, "xt": FEEDS["x"].T.copy()}
    _, _, out = quantize(model, feeds)
    assert op_counts(out)["MatMul"] == 1 and op_counts(out)["MatMulInteger"] == 1


def test_weight_shared_with_another_consumer_stays_fp32_for_it():
    """The weight also feeds an Add: it must remain as fp32 for that consumer."""
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["h"], name="mm"),
        helper.make_node("Add", ["h", "w"], ["y"], name="add_weight"),
    ]
    model = make(nodes, [tensor("x", [16, 16])], [tensor("y", [16, 16])], [weight("w", (16, 16))])
    feeds = {"x": np.random.default_rng(1).standard_normal((16, 16)).astype(np.float32)}
    tx_pass, _, out = quantize(model, feeds)
    assert "w" in {t.name for t in out.graph.initializer}
    assert "DequantizeLinear" not in op_counts(out)
    assert tx_pass.details["cosine"] > 0.98
    assert [n.input for n in out.graph.node if n.op_type == "Add"][0] == ["h", "w"]


def outlier_model() -> onnx.ModelProto:
    """Two MatMuls; a bias puts one huge channel into mm2's input, so int8 ruins mm2 only."""
    rng = np.random.default_rng(0)
    offset = np.zeros(16, np.float32)
    offset[3] = 500.0  # per-tensor activation range of mm2 spans 0..500: small channels vanish
    w2 = (rng.standard_normal((16, 16)) * 0.2).astype(np.float32)
    w2[3, :] = 0.0  # the outlier channel carries nothing: the small ones matter
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["h"], name="mm1"),
        helper.make_node("Add", ["h", "offset"], ["shifted"], name="offset"),
        helper.make_node("MatMul", ["shifted", "w2"], ["y"], name="mm2"),
    ]
    return make(
        nodes,
        [tensor("x", [8, 16])],
        [tensor("y", [8, 16])],
        [
            weight("w1", (16, 16)),
            numpy_helper.from_array(offset, "offset"),
            numpy_helper.from_array(w2, "w2"),
        ],
    )


def test_min_cosine_keeps_the_most_sensitive_matmul_fp32():
    plain, _, _ = quantize(outlier_model())
    assert plain.details["cosine"] < 0.99
    ranking = sensitivity(outlier_model(), ["mm1", "mm2"], FEEDS)
    assert ranking[0][0] == "mm2"
    guarded, _, out = quantize(outlier_model(), min_cosine=0.99)
    assert guarded.details["kept_fp32"] == ["mm2"] and guarded.details["cosine"] >= 0.99
    assert guarded.rule_counts == {"int8-matmul": 1, "kept-fp32": 1}
    assert op_counts(out)["MatMul"] == 1 and op_counts(out)["MatMulInteger"] == 1


def test_int4_uses_matmul_nbits():
    tx_pass = Quantize(PassContext("cpu", "cpu", FEEDS, {"precision": "int4"}))
    working = ir.serde.deserialize_model(linear_block())
    tx_pass(working)
    out = ir.serde.serialize_model(working)
    assert op_counts(out)["MatMulNBits"] == 2
    assert tx_pass.details["cosine"] > 0.98


def test_fp32_changes_nothing_and_bad_options_are_refused():
    tx_pass = Quantize(PassContext("cpu", "cpu", FEEDS, {}))
    assert not tx_pass(ir.serde.deserialize_model(linear_block())).modified
    with pytest.raises(TxError, match="must be in"):
        Quantize(PassContext("cpu", "cpu", FEEDS, {"precision": "int8", "min_cosine": 1.5}))


def test_cli_int8_end_to_end_and_bad_input(tmp_path, capsys):
    source = tmp_path / "block.onnx"
    onnx.save(linear_block(), source)
    out = tmp_path / "int8.onnx"
    assert main(["optimize", str(source), "-o", str(out), "--precision", "int8", "--batch", "4"]) == 0
    assert "MatMulInteger" in {n.op_type for n in onnx.load(out).graph.node}
    assert "kernel check (CPUExecutionProvider): all" in capsys.readouterr().out
    assert main(["optimize", str(source), "-o", str(out), "--precision", "int8", "--min-cosine", "2"]) == 2
    assert "--min-cosine 2" in capsys.readouterr().err
