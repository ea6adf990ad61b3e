"""quantize: per-token int8 / int4 weight-only MatMuls, with measured error and fp32 fallbacks."""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

from txcompile.cli import main
from txcompile.graph import ort as rt
from txcompile.graph.errors import TxError
from txcompile.passes.base import PassContext
from txcompile.passes.targets import int8_matmul
from txcompile.passes.targets.quantize import Int8Plan, Quantize, cosine, quantizable_matmuls

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


def int8_products(model: onnx.ModelProto) -> int:
    """Per-token (MatMulInteger) and per-tensor (DynamicQuantizeMatMul) int8 products."""
    ops = op_counts(model)
    return ops.get("MatMulInteger", 0) + ops.get("DynamicQuantizeMatMul", 0)


@pytest.mark.parametrize("mode", ["token", "tensor", "auto"])
def test_int8_quantizes_constant_weights_and_reports_error(mode):
    tx_pass, result, out = quantize(linear_block(), int8_activations=mode)
    assert result.modified and tx_pass.rule_counts["int8-matmul"] == 2
    ops = op_counts(out)
    assert int8_products(out) == 2 and "MatMul" not in ops
    if mode != "auto":
        per_token = 2 if mode == "token" else 0
        assert tx_pass.details["per_token_inputs"] == per_token and ops.get("QuantizeLinear", 0) == per_token
    # 16 features, 8-bit per-column weights, a LayerNorm that rescales the error: a loose bound
    assert tx_pass.details["cosine"] > 0.93 and 0 < tx_pass.details["max_abs_error"] < 1.0
    got = rt.run(rt.create_session(out), FEEDS)
    assert cosine(rt.run(rt.create_session(linear_block()), FEEDS), got) == pytest.approx(
        tx_pass.details["cosine"]
    )


@pytest.mark.parametrize("mode", ["tensor", "token"])
def test_a_bias_add_goes_into_the_per_tensor_product(mode):
    """mm1's bias Add becomes DynamicQuantizeMatMul's bias input; per token it stays an Add
    (onnxruntime's per-row kernel would drop a bias given to it)."""
    tx_pass, _, out = quantize(linear_block(), int8_activations=mode)
    ops = op_counts(out)
    dqmm = [n for n in out.graph.node if n.op_type == "DynamicQuantizeMatMul"]
    if mode == "token":
        assert ops["Add"] == 1 and not dqmm
        return
    assert "Add" not in ops and dqmm[0].input[4] == "b1"
    assert [n.output[0] for n in dqmm] == ["hb", "o"]  # the Add's output name carries on
    # the op adds the bias as the Add did: the same graph with the Add put back agrees
    unfolded = onnx.ModelProto()
    unfolded.CopyFrom(out)
    first = next(n for n in unfolded.graph.node if n.op_type == "DynamicQuantizeMatMul")
    del first.input[3:]
    first.output[0] = "product"
    unfolded.graph.node.insert(
        1 + list(unfolded.graph.node).index(first), helper.make_node("Add", ["product", "b1"], ["hb"])
    )
    got, expected = (rt.run(rt.create_session(m), FEEDS)["y"] for m in (out, unfolded))
    assert np.abs(got - expected).max() < 1e-5 and tx_pass.details["cosine"] > 0.93


def test_auto_scales_per_token_only_where_rows_differ():
    """Rows alike (wide ones, as hidden states are): per tensor is as good and faster. A few loud
    tokens: per token."""
    model = make(
        [helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")],
        [tensor("x", ["batch", 256])],
        [tensor("y", ["batch", 64])],
        [weight("w", (256, 64), 12)],
    )
    rng = np.random.default_rng(8)
    alike = rng.standard_normal((32, 256)).astype(np.float32)
    loud = alike.copy()
    loud[::8] *= 50.0
    assert not Int8Plan(model, ["mm"], {"x": alike}).schemes["x"].per_token
    tx_pass, _, out = quantize(model, {"x": loud})
    assert tx_pass.details["per_token_inputs"] == 1 and op_counts(out)["MatMulInteger"] == 1


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
    assert op_counts(out)["MatMul"] == 1 and int8_products(out) == 1


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
    """Two MatMuls; mm2 reads x plus spikes of 500 in a pair of channels whose weights cancel,
    a different pair in each row. In fp32 the spikes add nothing; in int8 they set every scale
    (per token or per tensor) and the small entries vanish, and smoothing cannot help: every
    channel spikes in some row."""
    spikes = np.zeros((8, 16), np.float32)
    for row in range(8):
        spikes[row, [2 * row, 2 * row + 1]] = 500.0
    w2 = numpy_helper.to_array(weight("w2", (16, 16), 2)).copy()
    w2[1::2] = -w2[::2]
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["y1"], name="mm1"),
        helper.make_node("Add", ["x", "spikes"], ["spiked"], name="spike"),
        helper.make_node("MatMul", ["spiked", "w2"], ["y2"], name="mm2"),
    ]
    return make(
        nodes,
        [tensor("x", [8, 16])],
        [tensor("y1", [8, 16]), tensor("y2", [8, 16])],
        [
            weight("w1", (16, 16), 1),
            numpy_helper.from_array(w2, "w2"),
            numpy_helper.from_array(spikes, "spikes"),
        ],
    )


def test_min_cosine_keeps_the_most_sensitive_matmul_fp32():
    plain, _, _ = quantize(outlier_model())
    assert plain.details["cosine"] < 0.99
    ranking = Int8Plan(outlier_model(), ["mm1", "mm2"], FEEDS).sensitivity()
    assert ranking[0][0] == "mm2" and ranking[0][1] > 10 * ranking[1][1]
    guarded, _, out = quantize(outlier_model(), min_cosine=0.99)
    assert guarded.details["kept_fp32"] == ["mm2"] and guarded.details["cosine"] >= 0.99
    assert guarded.rule_counts == {"int8-matmul": 1, "kept-fp32": 1}
    assert op_counts(out)["MatMul"] == 1 and int8_products(out) == 1


def test_the_graph_computes_the_simulated_rounding():
    """What the pass ranks by (int8_matmul.simulate) is what ORT runs, per-row scales included."""
    rng = np.random.default_rng(4)
    x = (rng.standard_normal((8, 16)) * rng.uniform(0.01, 100, (8, 1))).astype(np.float32)
    model = make(
        [helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")],
        [tensor("x", ["batch", 16])],
        [tensor("y", ["batch", 16])],
        [weight("w", (16, 16), 5)],
    )
    tx_pass, _, out = quantize(model, {"x": x})
    got = rt.run(rt.create_session(out), {"x": x})["y"]
    w = numpy_helper.to_array(model.graph.initializer[0])
    plan = Int8Plan(model, ["mm"], {"x": x})
    assert plan.schemes["x"].per_token  # rows 0.01x to 100x apart
    assert tx_pass.details["weight_bits"] == plan.bits
    expected = int8_matmul.simulate(
        x, w, plan.schemes["x"].divisor, plan.bits, per_token=plan.schemes["x"].per_token
    )
    assert np.abs(got - expected).max() <= 1e-5 * np.abs(expected).max()
    weights = [numpy_helper.to_array(t) for t in out.graph.initializer if t.data_type == TensorProto.INT8]
    bits = int8_matmul.weight_bits()
    assert len(weights) == 1 and np.abs(weights[0].astype(int)).max() == 2 ** (bits - 1) - 1
    assert {p.key: p.value for p in out.metadata_props}[int8_matmul.WEIGHT_BITS_KEY] == str(bits)


def test_weight_bits_follow_what_the_int8_kernel_takes(monkeypatch):
    """7-bit weights where ORT's kernel adds u8·s8 pairs in int16 (x86 without VNNI), else 8;
    an 8-bit model run on such a CPU is flagged."""
    monkeypatch.setattr(int8_matmul, "saturates_at_8_bits", lambda: True)
    tx_pass, _, out = quantize(linear_block())
    assert tx_pass.details["weight_bits"] == 7 and "saturate" in tx_pass.details["weights"]
    peaks = [
        np.abs(numpy_helper.to_array(t).astype(int)).max()
        for t in out.graph.initializer
        if t.data_type == TensorProto.INT8
    ]
    assert peaks == [63, 63]
    assert "saturate" in int8_matmul.saturation_warning(8) and int8_matmul.saturation_warning(7) is None
    monkeypatch.setattr(int8_matmul, "saturates_at_8_bits", lambda: False)
    assert (
        quantize(linear_block())[0].details["weight_bits"] == 8 and int8_matmul.saturation_warning(8) is None
    )


def test_a_token_s_result_does_not_depend_on_the_rest_of_the_batch():
    """One scale per token: a loud neighbour leaves a row alone. Per-tensor dynamic quantization
    (onnxruntime's quantize_dynamic) lets it coarsen every row."""
    rng = np.random.default_rng(5)
    quiet = rng.standard_normal((4, 16)).astype(np.float32)
    loud = np.concatenate([quiet, 1000 * rng.standard_normal((4, 16)).astype(np.float32)])
    _, _, out = quantize(linear_block(), {"x": loud}, int8_activations="token")
    session = rt.create_session(out)
    alone, together = rt.run(session, {"x": quiet})["y"], rt.run(session, {"x": loud})["y"][:4]
    assert np.abs(alone - together).max() <= 1e-6

    from onnxruntime.quantization import quantize_dynamic

    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "dynamic.onnx"
        quantize_dynamic(linear_block(), path, per_channel=True)
        ort_int8 = rt.create_session(str(path))
        per_tensor = rt.run(ort_int8, {"x": quiet})["y"] - rt.run(ort_int8, {"x": loud})["y"][:4]
    assert np.abs(per_tensor).max() > 0.1


def test_channel_outliers_are_smoothed_into_the_weights():
    """A few input features 100x the rest (trained BERT-family models have them): dividing them
    out before the per-token scale and into the weights cuts the error; the graph stays exact
    up to the rounding."""
    rng = np.random.default_rng(6)
    x = rng.standard_normal((64, 32)).astype(np.float32)
    x[:, [3, 17]] *= 100.0
    model = make(
        [helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")],
        [tensor("x", ["batch", 32])],
        [tensor("y", ["batch", 32])],
        [weight("w", (32, 32), 7)],
    )
    tx_pass, _, out = quantize(model, {"x": x}, int8_activations="token")
    assert tx_pass.details["smoothed_inputs"] == 1 and tx_pass.details["smoothing_alpha"] == 0.5
    w = numpy_helper.to_array(model.graph.initializer[0])
    exact = x.astype(np.float64) @ w
    smoothed = rt.run(rt.create_session(out), {"x": x})["y"]
    unsmoothed = int8_matmul.simulate(x, w)
    assert np.linalg.norm(smoothed - exact) < 0.5 * np.linalg.norm(unsmoothed - exact)


@pytest.mark.parametrize("mode", ["token", "tensor"])
def test_gemm_with_bias_and_rank3_inputs_sharing_one_quantization(mode):
    """Gemm(transB, C) keeps its bias; two MatMuls reading one [B, S, K] input share its
    quantization and get their [B, S, N] shape back; names of the products survive."""
    nodes = [
        helper.make_node("Gemm", ["x2", "wt", "c"], ["g"], name="gemm", transB=1),
        helper.make_node("MatMul", ["x3", "wa"], ["a"], name="mm_a"),
        helper.make_node("MatMul", ["x3", "wb"], ["b"], name="mm_b"),
    ]
    model = make(
        nodes,
        [tensor("x2", ["m", 16]), tensor("x3", ["batch", "seq", 16])],
        [tensor("g", ["m", 8]), tensor("a", ["batch", "seq", 16]), tensor("b", ["batch", "seq", 16])],
        [
            weight("wt", (8, 16), 8),
            weight("c", (8,), 9, 5.0),
            weight("wa", (16, 16), 10),
            weight("wb", (16, 16), 11),
        ],
    )
    rng = np.random.default_rng(7)
    feeds = {
        "x2": rng.standard_normal((5, 16)).astype(np.float32),
        "x3": rng.standard_normal((2, 3, 16)).astype(np.float32),
    }
    tx_pass, _, out = quantize(model, feeds, int8_activations=mode)
    assert tx_pass.rule_counts["int8-matmul"] == 3 and tx_pass.details["inputs"] == 2
    assert op_counts(out).get("QuantizeLinear", 0) == (2 if mode == "token" else 0)
    assert int8_products(out) == 3 and "Gemm" not in op_counts(out)
    got = rt.run(rt.create_session(out), feeds)
    want = rt.run(rt.create_session(model), feeds)
    assert [o.name for o in out.graph.output] == ["g", "a", "b"]
    for name in ("g", "a", "b"):
        assert got[name].shape == want[name].shape
        assert np.abs(got[name] - want[name]).max() < 0.05 * np.abs(want[name]).max()


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
    assert int8_products(onnx.load(out)) == 2
    assert "kernel check (CPUExecutionProvider): all" in capsys.readouterr().out
    assert main(["optimize", str(source), "-o", str(out), "--precision", "int8", "--min-cosine", "2"]) == 2
    assert "--min-cosine 2" in capsys.readouterr().err
    args = ["optimize", str(source), "-o", str(out), "--precision", "int8", "--int8-activations", "token"]
    assert main(args) == 0 and op_counts(onnx.load(out))["QuantizeLinear"] == 2


def test_run_warns_when_an_8_bit_model_meets_a_cpu_that_saturates(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(int8_matmul, "saturates_at_8_bits", lambda: False)
    _, _, out = quantize(linear_block())
    path = tmp_path / "int8.onnx"
    onnx.save(out, path)
    assert main(["run", str(path), "--batch", "2"]) == 0
    assert "saturate" not in capsys.readouterr().out
    monkeypatch.setattr(int8_matmul, "saturates_at_8_bits", lambda: True)
    assert main(["run", str(path), "--batch", "2"]) == 0
    assert "warning: this model's int8 weights use 8 bits" in capsys.readouterr().out
