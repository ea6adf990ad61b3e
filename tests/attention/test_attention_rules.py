"""Per-rule tests of fuse-attention on hand-built blocks: fuse, refuse, and keep shared values."""

from __future__ import annotations

import onnx
import pytest

from txcompile.graph.errors import TxError
from txcompile.passes.attention.fusion import FuseAttention

from .graphs import attention_block, feeds, max_diff, op_types, run_pass

ATOL = 1e-4


def _sites(tx_pass) -> list[dict]:
    return tx_pass.details["sites"]


@pytest.mark.parametrize(
    ("scale_where", "mask", "nan_guard"),
    [
        ("scores", "add", False),  # eager BERT: Div after Q·Kᵀ, additive 2-D padding bias
        ("qk", "where", True),  # dynamo sdpa: √scale on Q and Kᵀ, Where fill, NaN guard
        ("none", "none", False),  # scale folded into the weights, no mask (ViT)
    ],
)
def test_self_attention_becomes_packed_attention(scale_where, mask, nan_guard):
    model = attention_block(scale_where=scale_where, mask=mask, nan_guard=nan_guard)
    tx_pass, fused = run_pass(FuseAttention, model)
    assert op_types(fused).count("Attention") == 1
    assert not {"Softmax", "MatMul"} & set(op_types(fused))  # the three projections are packed in
    assert _sites(tx_pass) == [
        {
            "site": _sites(tx_pass)[0]["site"],
            "rule": "attention-packed-qkv",
            "status": "fused",
            "op": "com.microsoft.Attention",
            "reason": None,
            "scale": pytest.approx(1.0 if scale_where == "none" else 8**-0.5, rel=1e-5),
            "bias": {"add": ["add"], "where": ["fill-false"], "none": None}[mask],
        }
    ]
    assert tx_pass.rule_counts["attention-packed-qkv"] == 1
    # other sizes than the probe's: the fused graph must not have baked them in
    assert max_diff(model, fused, feeds(batch=3, seq=11)) < ATOL


def test_cross_attention_becomes_multi_head_attention_with_folded_biases():
    model = attention_block(kv_source="memory")
    tx_pass, fused = run_pass(FuseAttention, model)
    assert op_types(fused).count("MultiHeadAttention") == 1
    assert "Add" not in op_types(fused)  # Q/K/V projection biases fold into MHA's packed bias
    assert tx_pass.rule_counts == {"mha-bsh": 1, "fold-projection-bias": 1, "attention-bias": 1}
    assert max_diff(model, fused, feeds(batch=3, seq=11)) < ATOL


def test_split_qkv_projection_becomes_packed_attention():
    model = attention_block(packed_qkv=True)
    tx_pass, fused = run_pass(FuseAttention, model)
    assert op_types(fused).count("Attention") == 1
    assert not {"Split", "MatMul"} & set(op_types(fused))
    assert tx_pass.rule_counts["attention-packed-qkv"] == 1
    assert max_diff(model, fused, feeds(batch=3, seq=11)) < ATOL


def test_split_read_elsewhere_is_not_packed():
    model = attention_block(packed_qkv=True)
    model.graph.output.append(onnx.helper.make_tensor_value_info("qkv", onnx.TensorProto.FLOAT, None))
    tx_pass, fused = run_pass(FuseAttention, model)
    assert op_types(fused).count("MultiHeadAttention") == 1
    assert "attention-packed-qkv" not in tx_pass.rule_counts
    assert max_diff(model, fused, feeds(batch=3, seq=11)) < ATOL


def test_projection_read_elsewhere_is_not_packed():
    """K's projection is also a graph output: MHA still fuses, but nothing is packed or folded away."""
    model = attention_block()
    model.graph.output.append(onnx.helper.make_tensor_value_info("k_proj", onnx.TensorProto.FLOAT, None))
    tx_pass, fused = run_pass(FuseAttention, model)
    assert op_types(fused).count("MultiHeadAttention") == 1
    assert "attention-packed-qkv" not in tx_pass.rule_counts
    assert max_diff(model, fused, feeds(batch=3, seq=11)) < ATOL


def test_onnx_attention_op():
    model = attention_block()
    tx_pass, fused = run_pass(FuseAttention, model, {"attention_op": "onnx"})
    assert op_types(fused).count("Attention") == 1
    assert max(o.version for o in fused.opset_import if o.domain in ("", "ai.onnx")) >= 23
    assert max_diff(model, fused, feeds(batch=3, seq=11)) < ATOL


def test_bad_attention_op_is_an_error():
    with pytest.raises(TxError, match="--attention-op"):
        run_pass(FuseAttention, attention_block(), {"attention_op": "flash"})


def test_softmax_without_matmul_is_reported_unfused():
    model = attention_block(with_softmax_input_from_matmul=False, mask="none", scale_where="none")
    tx_pass, fused = run_pass(FuseAttention, model)
    assert "MultiHeadAttention" not in op_types(fused)
    (site,) = _sites(tx_pass)
    assert site["status"] == "unfused"
    assert "no MatMul above the Softmax" in site["reason"]


def test_softmax_over_another_axis_is_not_attention():
    tx_pass, fused = run_pass(FuseAttention, attention_block(softmax_axis=2))
    assert "MultiHeadAttention" not in op_types(fused)
    assert "axis 2" in _sites(tx_pass)[0]["reason"]


@pytest.mark.parametrize("extra_output", ["qk", "scaled", "probs"])
def test_shared_intermediate_is_not_fused(extra_output):
    model = attention_block(extra_output=extra_output)
    tx_pass, fused = run_pass(FuseAttention, model)
    assert "MultiHeadAttention" not in op_types(fused)
    assert tx_pass.details["unfused"] == 1
    reason = _sites(tx_pass)[0]["reason"]
    assert "another consumer" in reason or "graph output" in reason


def test_heads_come_from_the_graph_without_inputs():
    """No verification inputs and no static shapes: the site stays unfused, with the reason."""
    model = attention_block()
    tx_pass, fused = run_pass(FuseAttention, model, context_feeds={})
    assert "MultiHeadAttention" not in op_types(fused)
    assert "shapes" in _sites(tx_pass)[0]["reason"]


def test_bias_after_any_projection_folds_into_mha():
    """Q's bias follows a non-MatMul projection (as sparse-matmul's column groups leave it):
    it still folds into MHA's packed bias, so no Add pass over Q remains."""
    model = attention_block(kv_source="memory")
    add = next(n for n in model.graph.node if n.op_type == "Add" and n.output[0] == "q_proj")
    add.input[0] = "q_relu"
    relu = onnx.helper.make_node("Relu", ["q_mm"], ["q_relu"])
    model.graph.node.insert(list(model.graph.node).index(add), relu)
    tx_pass, fused = run_pass(FuseAttention, model)
    assert op_types(fused).count("MultiHeadAttention") == 1
    assert "Add" not in op_types(fused)
    assert tx_pass.rule_counts["fold-projection-bias"] == 1
    assert max_diff(model, fused, feeds(batch=3, seq=11)) < ATOL
