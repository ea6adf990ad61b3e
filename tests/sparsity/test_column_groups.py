"""sparse-matmul's column-group rule: exact for every block pattern it takes, dense where it should stay."""

from __future__ import annotations

import numpy as np
import pytest

from tests.sparsity import graphs
from txcompile.pass_manager import APPLIED, UNCHANGED
from txcompile.passes.sparsity import SparseMatMul, column_groups


def _rewrite(model, feeds, **options):
    options.setdefault("sparse_decision", "always")
    (record,), result = graphs.apply([SparseMatMul], model, feeds, **options)
    return record, result


@pytest.mark.parametrize("rows,cols", [(1, 32), (1, 16), (1, 8), (16, 16), (4, 4), (1, 64)])
def test_block_patterns_are_exact(rows, cols):
    weight = graphs.block_sparse(128, 256, rows, cols, 0.9)
    bias = np.linspace(-1, 1, 256).astype(np.float32)
    model, feeds = graphs.linear(weight, bias), graphs.feeds(128)
    record, result = _rewrite(model, feeds)
    assert record.status == APPLIED, record.reason
    assert record.rule_counts == {"column-groups": 1}
    assert record.max_diff <= 1e-4
    np.testing.assert_allclose(graphs.run(result, feeds)[0], graphs.run(model, feeds)[0], atol=1e-4)
    ops = graphs.ops(result)
    assert "Gather" in ops and ops["FusedMatMul"] == 1 and "MatMul" not in ops  # one batched product
    assert not any(t.name == "w" for t in result.graph.initializer)  # the dense weight is gone
    tagged = [n for n in result.graph.node if _rule(n) == "column-groups"]
    assert len(tagged) >= 5
    layer = record.details["layers"][0]
    assert layer["pattern"].startswith("column groups") and layer["params_saved"] > 0.8 * weight.size


def _rule(node) -> str | None:
    return {p.key: p.value for p in node.metadata_props}.get("txcompile.rule")


def test_rank2_input_and_graph_output():
    weight = graphs.block_sparse(64, 128, 1, 32, 0.9)
    model, feeds = graphs.linear(weight, rank=2, relu=False), {"x": graphs.feeds(64)["x"][0]}
    record, result = _rewrite(model, feeds)
    assert record.status == APPLIED and record.max_diff <= 1e-4
    assert "Shape" not in graphs.ops(result)  # rank 2 needs no reshapes back
    assert [o.name for o in result.graph.output] == ["y"]


def test_gemm_with_transposed_weight_and_bias():
    weight = graphs.block_sparse(64, 128, 1, 32, 0.9)
    model = graphs.gemm(np.ascontiguousarray(weight.T), np.arange(128, dtype=np.float32) / 100)
    feeds = {"x": graphs.feeds(64)["x"][0]}
    record, result = _rewrite(model, feeds)
    assert record.status == APPLIED and record.max_diff <= 1e-4
    assert "Gemm" not in graphs.ops(result)


def test_int8_is_approximate_and_reports_its_error():
    weight = graphs.block_sparse(128, 256, 1, 32, 0.9)
    model, feeds = graphs.linear(weight), graphs.feeds(128)
    record, result = _rewrite(model, feeds, precision="int8")
    assert record.status == APPLIED and not record.exact
    assert record.rule_counts == {"column-groups-int8": 1}
    assert "MatMulInteger" in graphs.ops(result) and "DynamicQuantizeLinear" in graphs.ops(result)
    reference = graphs.run(model, feeds)[0]
    error = np.abs(graphs.run(result, feeds)[0] - reference).max()
    assert 0 < error < 0.05 * np.abs(reference).max()  # int8 rounding, not a wrong result
    assert record.details["layers"][0]["weight_quant_error"] > 0


def test_irregular_sparsity_stays_dense():
    """Unstructured 90% (1x1) leaves nearly every input row live in each column group."""
    rng = np.random.default_rng(0)
    weight = rng.standard_normal((128, 256)).astype(np.float32)
    weight[rng.random(weight.shape) < 0.9] = 0
    record, _ = _rewrite(graphs.linear(weight), graphs.feeds(128), sparse_decision="cost")
    assert record.status == UNCHANGED
    (layer,) = record.details["layers"]
    assert layer["pattern"] == "dense" and layer["reason"].startswith("cost model")


def test_transposed_blocks_stay_dense():
    """32x1 blocks (32 input rows of one column) are the slow orientation: no column group wins."""
    weight = graphs.block_sparse(128, 256, 32, 1, 0.9)
    record, _ = _rewrite(graphs.linear(weight), graphs.feeds(128), sparse_decision="cost")
    assert record.status == UNCHANGED
    assert "cost model" in record.details["layers"][0]["reason"]


def test_dense_weight_is_left_alone():
    weight = np.random.default_rng(0).standard_normal((64, 64)).astype(np.float32)
    record, _ = _rewrite(graphs.linear(weight), graphs.feeds(64))
    assert record.status == UNCHANGED
    assert record.details["layers"][0]["reason"] == "only 0% zeros"


def test_measurement_decides_and_is_reported():
    weight = graphs.block_sparse(256, 1024, 1, 32, 0.95)
    record, _ = _rewrite(graphs.linear(weight), graphs.feeds(256), sparse_decision="measure")
    layer = record.details["layers"][0]
    assert layer["measured_speedup"] > 0
    assert (layer["pattern"] != "dense") == (layer["measured_speedup"] >= 1.1)


def test_weight_shared_with_an_embedding_gather_is_kept():
    """Another consumer of the weight: the MatMul is rewritten, the Gather keeps the table."""
    from onnx import TensorProto, helper

    weight = graphs.block_sparse(64, 128, 1, 32, 0.9)
    model = graphs.linear(weight)
    model.graph.node.append(helper.make_node("Gather", ["w", "ids"], ["emb"], axis=0))
    model.graph.input.append(helper.make_tensor_value_info("ids", TensorProto.INT64, [3]))
    model.graph.output.append(helper.make_tensor_value_info("emb", TensorProto.FLOAT, [3, 128]))
    feeds = {**graphs.feeds(64), "ids": np.array([0, 5, 63], dtype=np.int64)}
    record, result = _rewrite(model, feeds)
    assert record.status == APPLIED and record.max_diff <= 1e-4
    assert any(t.name == "w" for t in result.graph.initializer)


def test_packing_pads_uneven_groups_exactly():
    weight = np.zeros((16, 8), dtype=np.float32)
    weight[[1, 3, 5], 0:4] = 1.0  # group 0 reads 3 rows
    weight[7, 4:8] = 2.0  # group 1 reads 1 row, padded to 3 with zero weights
    groups = column_groups.pack(weight, 4)
    assert groups.width == 3 and groups.rows.shape == (2, 3)
    x = np.random.default_rng(0).standard_normal((5, 16)).astype(np.float32)
    gathered = x.T[groups.rows.reshape(-1)].reshape(2, 3, 5)
    product = np.matmul(groups.weights, gathered).reshape(8, 5).T
    np.testing.assert_allclose(product, x @ weight, atol=1e-6)


def test_layers_reading_the_same_input_share_one_transpose():
    """Q, K and V read the same hidden state: one Transpose (and one quantization) serves all three."""
    from onnx import TensorProto, helper, numpy_helper

    weights = [graphs.block_sparse(64, 64, 1, 32, 0.9, seed=s) for s in range(3)]
    nodes = [helper.make_node("MatMul", ["x", f"w{i}"], [f"m{i}"]) for i in range(3)]
    nodes += [helper.make_node("Relu", [f"m{i}"], [f"y{i}"]) for i in range(3)]
    model = graphs._model(
        nodes,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "seq", 64])],
        [helper.make_tensor_value_info(f"y{i}", TensorProto.FLOAT, ["batch", "seq", 64]) for i in range(3)],
        [numpy_helper.from_array(w, f"w{i}") for i, w in enumerate(weights)],
    )
    feeds = graphs.feeds(64)
    for precision, exact in ((None, True), ("int8", False)):
        record, result = _rewrite(model, feeds, precision=precision)
        assert record.status == APPLIED and sum(record.rule_counts.values()) == 3
        ops = graphs.ops(result)
        transposes_of_x = [
            n for n in result.graph.node if n.op_type == "Transpose" and n.input[0] in ("x",) or
            (n.op_type == "Transpose" and any(p.output[0] == n.input[0] and p.input[0] == "x"
                                              for p in result.graph.node if p.op_type == "Reshape"))
        ]  # fmt: skip
        assert len(transposes_of_x) == 1
        assert ops.get("DynamicQuantizeLinear", 0) == (0 if exact else 1)
        if exact:
            assert record.max_diff <= 1e-4


def _sparse_ffn():
    up = graphs.block_sparse(64, 256, 1, 32, 0.9)
    down = graphs.block_sparse(256, 64, 1, 32, 0.9, seed=1)
    bias = np.linspace(-1, 1, 256).astype(np.float32)
    return up, down, bias


def test_ffn_chain_stays_transposed_between_layers():
    up, down, bias = _sparse_ffn()
    model, feeds = graphs.ffn(up, down, bias), graphs.feeds(64)
    record, result = _rewrite(model, feeds)
    assert record.status == APPLIED and record.max_diff <= 1e-4
    assert record.rule_counts == {"column-groups": 2, "transposed-chain": 1}
    assert graphs.ops(result)["Transpose"] == 2  # X in, Y out; none around the Gelu
    assert graphs.initializer(result, "bias_column").shape == (256, 1)


def test_chain_in_int8():
    up, down, bias = _sparse_ffn()
    model, feeds = graphs.ffn(up, down, bias), graphs.feeds(64)
    record, result = _rewrite(model, feeds, precision="int8")
    assert record.status == APPLIED and record.rule_counts["transposed-chain"] == 1
    reference = graphs.run(model, feeds)[0]
    assert np.abs(graphs.run(result, feeds)[0] - reference).max() < 0.05 * np.abs(reference).max()


def test_swiglu_chain():
    gate, up = graphs.block_sparse(64, 256, 1, 32, 0.9), graphs.block_sparse(64, 256, 1, 32, 0.9, seed=2)
    down = graphs.block_sparse(256, 64, 1, 32, 0.9, seed=3)
    model, feeds = graphs.swiglu(gate, up, down), graphs.feeds(64)
    record, result = _rewrite(model, feeds)
    assert record.status == APPLIED and record.max_diff <= 1e-4
    assert record.rule_counts == {"column-groups": 3, "transposed-chain": 1}


def test_no_chain_when_the_hidden_activation_has_another_consumer():
    up, down, bias = _sparse_ffn()
    model, feeds = graphs.ffn(up, down, bias, expose_hidden=True), graphs.feeds(64)
    record, result = _rewrite(model, feeds)
    assert record.status == APPLIED and record.max_diff <= 1e-4
    assert record.rule_counts == {"column-groups": 2}
