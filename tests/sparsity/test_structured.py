"""sparse-matmul's structured rule: vanished channels are cut from both layers, exactly."""

from __future__ import annotations

import numpy as np

from tests.sparsity import graphs
from txcompile.pass_manager import APPLIED
from txcompile.passes.sparsity import SparseMatMul

HIDDEN, INNER = 32, 128


def _ffn_weights(seed: int = 0):
    rng = np.random.default_rng(seed)
    up = (rng.standard_normal((HIDDEN, INNER)) / np.sqrt(HIDDEN)).astype(np.float32)
    down = (rng.standard_normal((INNER, HIDDEN)) / np.sqrt(INNER)).astype(np.float32)
    bias = (0.5 * rng.standard_normal(INNER)).astype(np.float32)
    return up, down, bias


def _rewrite(model, feeds):
    (record,), result = graphs.apply([SparseMatMul], model, feeds, sparse_decision="cost")
    return record, result


def _shape(model, name):
    node = next(n for n in model.graph.node if n.op_type == "MatMul" and n.output[0] == name)
    return graphs.initializer(model, node.input[1]).shape


def test_unused_channels_are_sliced_from_both_layers():
    up, down, bias = _ffn_weights()
    down[32:] = 0  # the down projection reads only the first 32 channels
    model, feeds = graphs.ffn(up, down, bias), graphs.feeds(HIDDEN)
    record, result = _rewrite(model, feeds)
    assert record.status == APPLIED and record.max_diff <= 1e-4
    assert record.rule_counts["structured-channels"] == 1
    assert _shape(result, "h") == (HIDDEN, 32) and _shape(result, "d") == (32, HIDDEN)
    assert graphs.initializer(result, "sparse_bias_kept").shape == (32,)
    layer = record.details["layers"][0]
    assert layer["pattern"] == "structured: 128 -> 32 channels"
    assert layer["params_saved"] == 2 * 96 * HIDDEN


def test_silent_channels_fold_their_constant_into_a_bias():
    """up's columns zero, bias not: Gelu(bias) still reaches the down projection, as a constant."""
    up, down, bias = _ffn_weights(1)
    up[:, 64:] = 0
    model, feeds = graphs.ffn(up, down, bias), graphs.feeds(HIDDEN)
    record, result = _rewrite(model, feeds)
    assert record.status == APPLIED and record.max_diff <= 1e-4
    assert _shape(result, "h") == (HIDDEN, 64)
    assert "silent" not in record.details["layers"][0]["note"]
    assert record.details["layers"][0]["note"].endswith("64")
    assert graphs.ops(result)["Add"] == graphs.ops(model)["Add"] + 1  # d + folded constant


def test_kept_channels_stay_a_multiple_of_32():
    up, down, bias = _ffn_weights(2)
    down[40:] = 0  # 40 live channels: keep 64 so the up projection still splits into column groups
    record, result = _rewrite(graphs.ffn(up, down, bias), graphs.feeds(HIDDEN))
    assert record.status == APPLIED
    assert _shape(result, "h") == (HIDDEN, 64)


def test_swiglu_slices_gate_and_up_together():
    rng = np.random.default_rng(3)
    gate, up = (rng.standard_normal((2, HIDDEN, INNER)) / np.sqrt(HIDDEN)).astype(np.float32)
    down = (rng.standard_normal((INNER, HIDDEN)) / np.sqrt(INNER)).astype(np.float32)
    down[::2] = 0
    down[1::4] = 0  # 32 live channels
    model, feeds = graphs.swiglu(gate, up, down), graphs.feeds(HIDDEN)
    record, result = _rewrite(model, feeds)
    assert record.status == APPLIED and record.max_diff <= 1e-4
    assert _shape(result, "g") == (HIDDEN, 32) and _shape(result, "u") == (HIDDEN, 32)
    assert record.details["layers"][0]["sources"] == ["gate", "up"]


def test_not_elementwise_between_layers_is_left_alone():
    up, down, bias = _ffn_weights()
    down[32:] = 0
    model = graphs.ffn(up, down, bias, between="Softmax")  # mixes channels: nothing may be cut
    record, result = _rewrite(model, graphs.feeds(HIDDEN))
    assert "structured-channels" not in record.rule_counts
    assert graphs.initializer(result, "up").shape == (HIDDEN, INNER)
    # the down projection alone still gathers just its 32 live input rows, exactly
    assert record.rule_counts == {"column-groups": 1} and record.max_diff <= 1e-4


def test_hidden_activation_with_another_consumer_is_not_sliced():
    up, down, bias = _ffn_weights()
    down[32:] = 0
    model = graphs.ffn(up, down, bias, expose_hidden=True)  # Gelu output is also a graph output
    record, result = _rewrite(model, graphs.feeds(HIDDEN))
    assert "structured-channels" not in record.rule_counts
    assert graphs.initializer(result, "up").shape == (HIDDEN, INNER)


def test_block_sparse_sources_lose_only_whole_groups():
    """Cutting single columns of a 1x32 block-sparse up projection would scramble its column
    groups: only a whole dead group of 32 channels goes, the lone dead channel stays."""
    up = graphs.block_sparse(HIDDEN, INNER, 1, 32, 0.75)
    _, down, bias = _ffn_weights()
    down[0:32] = 0
    down[40] = 0
    record, result = _rewrite(graphs.ffn(up, down, bias), graphs.feeds(HIDDEN))
    assert record.status == APPLIED and record.max_diff <= 1e-4
    assert record.details["layers"][0]["pattern"] == "structured: 128 -> 96 channels"
