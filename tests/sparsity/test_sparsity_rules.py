"""sparse-matmul's rules one at a time: a match, a non-match with its reason, and a value that
another node also reads (DESIGN.md's three tests per rule)."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
from onnx import TensorProto, helper

from tests.sparsity import graphs
from txcompile.passes.base import PassContext
from txcompile.passes.sparsity import RULES, SparseMatMul


def _run(model: onnx.ModelProto, **flags):
    tx_pass = SparseMatMul(PassContext(flags={"sparse_decision": "always", **flags}))
    working = ir.serde.deserialize_model(model)
    tx_pass(working)
    return tx_pass, ir.serde.serialize_model(working)


def _sites(tx_pass, rule: str) -> list[dict]:
    return [s for s in tx_pass.details["sites"] if s["rule"].startswith(rule)]


def _same_outputs(model, result, feeds, atol=1e-4):
    for got, want in zip(graphs.run(result, feeds), graphs.run(model, feeds), strict=True):
        np.testing.assert_allclose(got, want, atol=atol)


def _ffn(up, down, **kwargs):
    return graphs.ffn(up, down, np.linspace(-1, 1, up.shape[1]).astype(np.float32), **kwargs)


UP = graphs.block_sparse(64, 128, 1, 32, 0.8, 1)
DOWN = graphs.block_sparse(128, 64, 1, 32, 0.8, 2)
DENSE_DOWN = (np.random.default_rng(3).standard_normal((128, 64)) / 12).astype(np.float32)


def test_the_family_lists_its_rules_in_order():
    assert list(RULES) == ["structured-channels", "transposed-chain", "column-groups"]


# -- structured-channels ---------------------------------------------------------------------


def test_structured_channels_cuts_dead_channels():
    up, down = UP.copy(), DOWN.copy()
    up[:, :32] = 0  # constant channels (folded into a bias after the sink)
    down[32:64] = 0  # unused channels
    model, feeds = _ffn(up, down), graphs.feeds(64)
    tx_pass, result = _run(model, sparse_decision="cost")
    (site,) = _sites(tx_pass, "structured-channels")
    assert site["status"] == "fused" and site["site"] == "down" and site["op"] == "MatMul"
    assert site["pattern"] == "structured: 128 -> 64 channels"
    assert tx_pass.rule_counts["structured-channels"] == 1
    _same_outputs(model, result, feeds)


def test_structured_channels_without_dead_channels_says_so():
    tx_pass, _ = _run(_ffn(UP, DOWN))
    (site,) = _sites(tx_pass, "structured-channels")
    assert site["status"] == "unfused" and site["reason"] == "no dead channels"


def test_structured_channels_refuses_a_pair_whose_hidden_value_is_also_an_output():
    up, down = UP.copy(), DOWN.copy()
    down[32:64] = 0
    model, feeds = _ffn(up, down, expose_hidden=True), graphs.feeds(64)
    tx_pass, result = _run(model)
    (site,) = _sites(tx_pass, "structured-channels")
    assert site["status"] == "unfused"
    assert site["reason"] == "act has another consumer outside the layer pair"
    assert "structured-channels" not in tx_pass.rule_counts
    _same_outputs(model, result, feeds)  # the exposed hidden value keeps every channel


# -- transposed-chain ------------------------------------------------------------------------


def test_transposed_chain_keeps_a_sparse_pair_transposed():
    model, feeds = _ffn(UP, DOWN), graphs.feeds(64)
    tx_pass, result = _run(model)
    (site,) = _sites(tx_pass, "transposed-chain")
    assert site["status"] == "fused" and site["site"] == "down" and site["chain"] == ["up"]
    assert tx_pass.rule_counts == {"column-groups": 2, "transposed-chain": 1}
    assert tx_pass.details["layers"][1]["chain"] == ["up"]
    _same_outputs(model, result, feeds)


def test_transposed_chain_needs_every_layer_sparse():
    tx_pass, _ = _run(_ffn(UP, DENSE_DOWN))
    (site,) = _sites(tx_pass, "transposed-chain")
    assert site["status"] == "unfused" and site["reason"] == "down stays dense"
    assert tx_pass.rule_counts == {"column-groups": 1}


def test_transposed_chain_is_not_formed_around_a_value_read_elsewhere():
    model, feeds = _ffn(UP, DOWN, expose_hidden=True), graphs.feeds(64)
    tx_pass, result = _run(model)
    assert _sites(tx_pass, "transposed-chain") == []
    assert tx_pass.rule_counts == {"column-groups": 2}  # each layer on its own, untransposed
    _same_outputs(model, result, feeds)  # the exposed value is still [batch, seq, 128]


# -- column-groups ---------------------------------------------------------------------------


def test_column_groups_rewrites_a_block_sparse_linear():
    weight = graphs.block_sparse(128, 256, 1, 32, 0.9)
    model, feeds = graphs.linear(weight), graphs.feeds(128)
    tx_pass, result = _run(model)
    (site,) = _sites(tx_pass, "column-groups")
    assert site["status"] == "fused" and site["site"] == "w" and site["op"] == "FusedMatMul"
    assert site["pattern"].startswith("column groups bn=")
    _same_outputs(model, result, feeds)


def test_column_groups_int8_is_its_own_rule_name():
    weight = graphs.block_sparse(128, 256, 1, 32, 0.9)
    model, feeds = graphs.linear(weight), graphs.feeds(128)
    tx_pass, result = _run(model, precision="int8")
    (site,) = _sites(tx_pass, "column-groups")
    assert site["rule"] == "column-groups-int8" and site["op"] == "MatMulInteger"
    _same_outputs(model, result, feeds, atol=0.05)


def test_column_groups_leaves_a_dense_weight_with_its_reason():
    tx_pass, _ = _run(graphs.linear(np.ones((64, 64), np.float32)), sparse_decision="cost")
    (site,) = _sites(tx_pass, "column-groups")
    assert site["status"] == "unfused" and site["reason"] == "only 0% zeros"
    assert not tx_pass.rule_counts


def test_column_groups_share_one_transpose_of_an_input_read_three_times():
    """r feeds two sparse linears and is also a graph output: one transpose of it serves both,
    and r itself stays as it was."""
    w1, w2 = graphs.block_sparse(64, 128, 1, 32, 0.8, 4), graphs.block_sparse(64, 128, 1, 32, 0.8, 5)
    shape = ["batch", "seq", 64]
    model = graphs._model(
        [
            helper.make_node("Relu", ["x"], ["r"]),
            helper.make_node("MatMul", ["r", "w1"], ["a"]),
            helper.make_node("MatMul", ["r", "w2"], ["b"]),
            helper.make_node("Add", ["a", "b"], ["y"]),
        ],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
        [
            helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", "seq", 128]),
            helper.make_tensor_value_info("r", TensorProto.FLOAT, shape),
        ],
        [graphs._init(w1, "w1"), graphs._init(w2, "w2")],
    )
    feeds = graphs.feeds(64)
    tx_pass, result = _run(model)
    assert [s["status"] for s in _sites(tx_pass, "column-groups")] == ["fused", "fused"]
    flips = [n for n in result.graph.node if n.op_type == "Transpose" and list(n.attribute[0].ints) == [1, 0]]
    assert len(flips) == 1
    _same_outputs(model, result, feeds)


# -- prune (a whole-layer ranking, not a rule: its layers still land in the shared records) ----


def test_prune_records_each_layer_pruned_or_skipped_with_why():
    from txcompile.passes.sparsity import Prune

    dense = (np.random.default_rng(0).standard_normal((64, 128)) / 8).astype(np.float32)
    for relu, status, reason in [(True, "fused", None), (False, "unfused", "final projection")]:
        tx_pass = Prune(PassContext(flags={"sparsity": 0.9, "block": "1x32"}))
        tx_pass(ir.serde.deserialize_model(graphs.linear(dense, relu=relu)))
        (site,) = tx_pass.details["sites"]
        assert site["site"] == "w" and site["rule"] == "blocks-1x32" and site["status"] == status
        assert (site["reason"] or "").startswith(reason or "")
        assert site["op"] == ("MatMul" if status == "fused" else None)
