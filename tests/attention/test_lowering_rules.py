"""The attention rules one at a time: the read, each lowering, the bias rules, Q's head merge.

Per rule (DESIGN.md): a match, a non-match with its reason, and a site where an intermediate
value has another consumer. A lowering runs alone by giving FuseAttention only that rule.
"""

from __future__ import annotations

import onnx
import onnx_ir as ir
import pytest

from txcompile.passes.attention import (
    RULES,
    AttentionBias,
    FoldProjectionBias,
    FuseAttention,
    GroupQueryAttention,
    MultiHeadAttentionBnsh,
    MultiHeadAttentionBsh,
    OnnxAttention,
    OnnxAttentionBsh,
    OnnxAttentionMatMul,
    PackedAttention,
    PackedMatMul,
    QueryMergeHeads,
    ReadAttention,
)
from txcompile.passes.base import PassContext

from .graphs import (
    HEAD_DIM,
    HEADS,
    HIDDEN,
    SEQ,
    add_output,
    attention_block,
    causal,
    feeds,
    heads_first,
    max_diff,
    op_types,
    run_pass,
)

ATOL = 1e-4
MHA, ATTENTION, GQA = (
    f"com.microsoft.{op}" for op in ("MultiHeadAttention", "Attention", "GroupQueryAttention")
)


def only(rule):
    """FuseAttention applying just ``rule`` (a lowering, or the read alone)."""
    return type(f"Only{rule.__name__}", (FuseAttention,), {"rules": (rule,)})


def lower(rule, model: onnx.ModelProto, flags: dict | None = None, **kwargs):
    tx_pass, fused = run_pass(only(rule), model, flags, **kwargs)
    (site,) = tx_pass.details["sites"]
    return tx_pass, fused, site


def read_state(model: onnx.ModelProto, flags: dict | None = None):
    """(IR model, the pass's state, the reading of its one site) without rewriting anything."""
    working = ir.serde.deserialize_model(model)
    tx_pass = FuseAttention(PassContext(feeds=feeds(), flags=flags or {}))
    state = tx_pass.prepare(working)
    return working, state, state.reading(state.sites[0])


def value(model: ir.Model, name: str) -> ir.Value:
    return next(o for n in model.graph for o in n.outputs if o.name == name)


def assert_fused(tx_pass, fused, model, site, rule, op):
    assert (site["status"], site["rule"], site["op"]) == ("fused", rule, op)
    assert tx_pass.rule_counts[rule] == 1
    assert "Softmax" not in op_types(fused)
    tags = {p.value for n in fused.graph.node for p in n.metadata_props if p.key == "txcompile.rule"}
    assert tags == {rule}
    assert max_diff(model, fused, feeds()) < ATOL


def test_the_family_lists_every_rule_name():
    names = {"query-merge-heads", "mha-bsh", "mha-bnsh-kv", "attention-packed-qkv", "mha-qkv-matmul", "gqa"}
    names |= {
        "onnx-attention",
        "onnx-attention-qkv-matmul",
        "onnx-attention-bsh",
        "fold-projection-bias",
        "attention-bias",
        "cache-padding-bias",
    }
    names |= {"read-attention"}
    names |= {"embed-layer-norm", "rotary-embedding"}  # the family's other RulePasses
    assert set(RULES) == names


# read-attention ---------------------------------------------------------------------------------


def test_read_decides_heads_scale_mask_and_layout():
    _, _, reading = read_state(attention_block())
    layout = reading.layout
    assert (layout.batch, layout.heads, layout.seq, layout.keys, layout.head_dim) == (
        2,
        HEADS,
        SEQ,
        SEQ,
        HEAD_DIM,
    )
    assert reading.facts() == {"scale": round(HEAD_DIM**-0.5, 6), "bias": ["add"]}
    assert [v.name for v in (reading.query_bsh, reading.key_bsh, reading.value_bsh)] == [
        "q_proj",
        "k_proj",
        "v_proj",
    ]
    assert reading.key_bnsh is None


def test_read_refuses_a_softmax_over_another_axis():
    model = attention_block(softmax_axis=2)
    tx_pass, fused, site = lower(ReadAttention, model)
    assert (site["status"], site["rule"]) == ("unfused", "read-attention")
    assert site["reason"] == "Softmax over axis 2, not the last"
    assert op_types(fused) == op_types(model)


def test_read_refuses_without_shapes():
    _, _, site = lower(ReadAttention, attention_block(), context_feeds={})
    assert site["reason"] == "shapes of Q, K, V unknown (no static shapes and no verification inputs)"


def test_read_refuses_probabilities_another_node_reads():
    model = attention_block(extra_output="probs")
    tx_pass, fused, site = lower(FuseAttention.rules[0], model)
    assert (site["status"], site["rule"]) == ("unfused", "read-attention")
    assert site["reason"] == "the attention probabilities are a graph output"
    assert op_types(fused) == op_types(model) and not tx_pass.rule_counts


# mha-bsh -----------------------------------------------------------------------------------------


def test_mha_bsh_takes_cross_attention():
    model = attention_block(kv_source="memory")
    tx_pass, fused, site = lower(MultiHeadAttentionBsh, model)
    assert_fused(tx_pass, fused, model, site, "mha-bsh", MHA)


def test_mha_bsh_refuses_keys_worked_on_in_heads():
    _, fused, site = lower(MultiHeadAttentionBsh, heads_first(attention_block(), "k"))
    assert (site["status"], site["rule"]) == ("unfused", "mha-bsh")
    assert site["reason"] == "K/V are not [B, L, hidden] tensors split into heads"
    assert "Softmax" in op_types(fused)


def test_mha_bsh_keeps_a_projection_read_elsewhere():
    model = add_output(attention_block(kv_source="memory"), "k_proj")
    tx_pass, fused, site = lower(MultiHeadAttentionBsh, model)
    assert site["op"] == MHA
    assert "k_proj" in [o.name for o in fused.graph.output]
    assert max_diff(model, fused, feeds()) < ATOL


# mha-bnsh-kv -------------------------------------------------------------------------------------


def test_mha_bnsh_takes_keys_worked_on_in_heads():
    model = heads_first(attention_block(), "k")
    tx_pass, fused, site = lower(MultiHeadAttentionBnsh, model)
    assert_fused(tx_pass, fused, model, site, "mha-bnsh-kv", MHA)
    assert "query-merge-heads" not in tx_pass.rule_counts  # Q is read as the graph's [B, S, hidden]


def test_mha_bnsh_refuses_what_the_read_refused():
    """It takes every read site; a site the read cannot finish (no shapes) keeps the read's reason."""
    _, fused, site = lower(MultiHeadAttentionBnsh, attention_block(), context_feeds={})
    assert (site["status"], site["rule"]) == ("unfused", "mha-bnsh-kv")
    assert site["reason"] == "shapes of Q, K, V unknown (no static shapes and no verification inputs)"
    assert "Softmax" in op_types(fused)


def test_mha_bnsh_keeps_the_head_split_key_read_elsewhere():
    model = add_output(heads_first(attention_block(), "k"), "k4r")
    _, fused, site = lower(MultiHeadAttentionBnsh, model)
    assert site["op"] == MHA and "k4r" in [o.name for o in fused.graph.output]
    assert max_diff(model, fused, feeds()) < ATOL


# attention-packed-qkv ----------------------------------------------------------------------------


def test_packed_attention_takes_one_input_projected_three_times():
    model = attention_block()
    tx_pass, fused, site = lower(PackedAttention, model)
    assert_fused(tx_pass, fused, model, site, "attention-packed-qkv", ATTENTION)


def test_packed_attention_refuses_cross_attention():
    _, _, site = lower(PackedAttention, attention_block(kv_source="memory"))
    assert site["reason"] == "Q, K and V are not projections of one input read only by this site"


def test_packed_attention_refuses_a_split_read_elsewhere():
    model = add_output(attention_block(packed_qkv=True), "qkv")
    _, fused, site = lower(PackedAttention, model)
    assert site["reason"] == "Q, K and V are not projections of one input read only by this site"
    assert "Softmax" in op_types(fused)


# mha-qkv-matmul ----------------------------------------------------------------------------------


def test_packed_matmul_takes_the_int8_site():
    model = attention_block()
    tx_pass, fused, site = lower(PackedMatMul, model, {"precision": "int8"})
    assert_fused(tx_pass, fused, model, site, "mha-qkv-matmul", MHA)
    assert op_types(fused).count("MatMul") == 1 and "Split" in op_types(fused)


def test_packed_matmul_refuses_fp32():
    _, _, site = lower(PackedMatMul, attention_block())
    assert site["reason"] == "not int8"


def test_packed_matmul_refuses_a_projection_read_elsewhere():
    _, _, site = lower(PackedMatMul, add_output(attention_block(), "k_proj"), {"precision": "int8"})
    assert site["reason"] == "Q, K and V are not projections of one input read only by this site"


# onnx-attention-qkv-matmul -----------------------------------------------------------------------


def test_onnx_attention_matmul_takes_the_int8_cpu_site():
    model = attention_block()
    tx_pass, fused, site = lower(OnnxAttentionMatMul, model, {"precision": "int8"})
    assert_fused(tx_pass, fused, model, site, "onnx-attention-qkv-matmul", "Attention")
    ops = op_types(fused)
    assert ops.count("MatMul") == 1 and "Split" in ops and "Transpose" not in ops  # [B, S, hidden] in
    assert max(o.version for o in fused.opset_import if o.domain in ("", "ai.onnx")) == 23
    assert max_diff(model, fused, feeds(batch=3, seq=11)) < ATOL  # no probe size baked in


def test_onnx_attention_matmul_refuses_fp32_and_other_targets():
    _, _, site = lower(OnnxAttentionMatMul, attention_block())
    assert site["reason"] == "not int8"
    tx_pass = only(OnnxAttentionMatMul)(PassContext("gpu", "cuda", feeds(), {"precision": "int8"}))
    tx_pass(ir.serde.deserialize_model(attention_block()))
    (site,) = tx_pass.details["sites"]
    assert site["reason"] == "ONNX Attention is the faster form on the CPU only"


def test_onnx_attention_matmul_refuses_a_projection_read_elsewhere():
    model = add_output(attention_block(), "k_proj")
    _, fused, site = lower(OnnxAttentionMatMul, model, {"precision": "int8"})
    assert site["reason"] == "Q, K and V are not projections of one input read only by this site"
    assert max(o.version for o in fused.opset_import if o.domain in ("", "ai.onnx")) == 18


def test_int8_pipeline_on_the_cpu_takes_onnx_attention_first():
    tx_pass, fused = run_pass(FuseAttention, attention_block(), {"precision": "int8"})
    (site,) = tx_pass.details["sites"]
    assert (site["rule"], site["op"]) == ("onnx-attention-qkv-matmul", "Attention")


# onnx-attention-bsh ------------------------------------------------------------------------------


def _attributes(model: onnx.ModelProto, op: str) -> dict:
    (node,) = [n for n in model.graph.node if n.op_type == op]
    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


def test_onnx_attention_bsh_takes_keys_worked_on_in_heads():
    model = heads_first(attention_block(), "k")
    tx_pass, fused, site = lower(OnnxAttentionBsh, model)
    assert_fused(tx_pass, fused, model, site, "onnx-attention-bsh", "Attention")
    attributes = _attributes(fused, "Attention")
    assert (attributes["q_num_heads"], attributes["kv_num_heads"]) == (HEADS, HEADS)
    assert max(o.version for o in fused.opset_import if o.domain in ("", "ai.onnx")) == 23
    assert max_diff(model, fused, feeds(batch=3, seq=11)) < ATOL  # no probe size baked in


def test_onnx_attention_bsh_refuses_other_targets():
    model = heads_first(attention_block(), "k")
    _, fused, site = lower(OnnxAttentionBsh, model, target="gpu")
    assert (site["status"], site["reason"]) == (
        "unfused",
        "ONNX Attention is the faster form on the CPU only",
    )
    assert "Softmax" in op_types(fused)


def test_onnx_attention_bsh_keeps_the_head_split_key_read_elsewhere():
    model = add_output(heads_first(attention_block(), "k"), "k4r")
    _, fused, site = lower(OnnxAttentionBsh, model)
    assert site["op"] == "Attention" and "k4r" in [o.name for o in fused.graph.output]
    assert max_diff(model, fused, feeds()) < ATOL


# gqa ---------------------------------------------------------------------------------------------

GQA_FLAGS = {"attention_op": "gqa"}


def test_gqa_takes_a_causal_padded_site():
    model = causal(attention_block())
    tx_pass, fused, site = lower(GroupQueryAttention, model, GQA_FLAGS)
    assert_fused(tx_pass, fused, model, site, "gqa", GQA)


def test_gqa_refuses_a_mask_that_is_not_causal():
    _, _, site = lower(GroupQueryAttention, attention_block(), GQA_FLAGS)
    assert site["reason"] == "mask is not causal ∧ padding"


def test_gqa_fallback_notes_why_not():
    tx_pass, _, site = lower(FuseAttention.rules[0], attention_block(), GQA_FLAGS)
    assert (site["rule"], site["op"]) == ("attention-packed-qkv", ATTENTION)
    assert site["note"] == "not GroupQueryAttention: mask is not causal ∧ padding"
    assert tx_pass.details["attention_op"] == "gqa"


def test_gqa_keeps_a_projection_read_elsewhere():
    model = add_output(causal(attention_block()), "k_proj")
    _, fused, site = lower(GroupQueryAttention, model, GQA_FLAGS)
    assert site["op"] == GQA and "k_proj" in [o.name for o in fused.graph.output]
    assert max_diff(model, fused, feeds()) < ATOL


# onnx-attention ----------------------------------------------------------------------------------


def test_onnx_attention_takes_a_read_site():
    model = attention_block()
    tx_pass, fused, site = lower(OnnxAttention, model, {"attention_op": "onnx"})
    assert_fused(tx_pass, fused, model, site, "onnx-attention", "Attention")
    assert max(o.version for o in fused.opset_import if o.domain in ("", "ai.onnx")) == 23


def test_onnx_attention_refuses_what_the_read_refused():
    _, fused, site = lower(OnnxAttention, attention_block(), {"attention_op": "onnx"}, context_feeds={})
    assert (site["rule"], site["status"]) == ("onnx-attention", "unfused")
    assert site["reason"] == "shapes of Q, K, V unknown (no static shapes and no verification inputs)"
    assert max(o.version for o in fused.opset_import if o.domain in ("", "ai.onnx")) == 18


def test_onnx_attention_keeps_a_projection_read_elsewhere():
    model = add_output(attention_block(), "k_proj")
    _, fused, site = lower(OnnxAttention, model, {"attention_op": "onnx"})
    assert site["op"] == "Attention" and "k_proj" in [o.name for o in fused.graph.output]
    assert max_diff(model, fused, feeds()) < ATOL


# fold-projection-bias ----------------------------------------------------------------------------


def test_fold_takes_a_bias_added_to_a_projection():
    working, state, _ = read_state(attention_block(kv_source="memory"))
    k_proj = value(working, "k_proj")
    assert FoldProjectionBias().check(k_proj, HIDDEN, state.shapes) is None
    folded, parts = FoldProjectionBias().plan([k_proj], HIDDEN, state.shapes)
    assert folded[0].name == "k_mm" and parts[0].shape == (HIDDEN,)


def test_fold_refuses_a_projection_without_bias():
    working, state, _ = read_state(attention_block())
    assert FoldProjectionBias().check(value(working, "k_mm"), HIDDEN, state.shapes) == "not an Add of a bias"


def test_fold_refuses_a_biased_projection_another_node_reads():
    model = attention_block(kv_source="memory")
    model.graph.node.append(onnx.helper.make_node("Identity", ["k_proj"], ["k_copy"]))
    add_output(model, "k_copy")
    working, state, _ = read_state(model)
    reason = FoldProjectionBias().check(value(working, "k_proj"), HIDDEN, state.shapes)
    assert reason == "k_proj has another consumer"
    tx_pass, fused, site = lower(MultiHeadAttentionBsh, model)
    assert site["op"] == MHA and tx_pass.rule_counts["fold-projection-bias"] == 1  # Q's and V's fold
    assert max_diff(model, fused, feeds()) < ATOL


# attention-bias ----------------------------------------------------------------------------------


def test_attention_bias_takes_the_padding_mask():
    _, _, reading = read_state(attention_block())
    assert AttentionBias().check(reading) is None
    tx_pass, _, _ = lower(MultiHeadAttentionBsh, attention_block())
    assert tx_pass.rule_counts["attention-bias"] == 1


def test_attention_bias_refuses_unmasked_scores():
    _, _, reading = read_state(attention_block(mask="none"))
    assert AttentionBias().check(reading) == "no mask or bias on the scores"
    tx_pass, _, _ = lower(MultiHeadAttentionBsh, attention_block(mask="none"))
    assert "attention-bias" not in tx_pass.rule_counts


def test_attention_bias_keeps_a_mask_read_elsewhere():
    model = add_output(attention_block(), "bias")
    tx_pass, fused, site = lower(MultiHeadAttentionBsh, model)
    assert site["op"] == MHA and "bias" in [o.name for o in fused.graph.output]
    assert max_diff(model, fused, feeds()) < ATOL


# query-merge-heads -------------------------------------------------------------------------------


def test_query_merge_takes_a_query_worked_on_in_heads():
    model = heads_first(attention_block(), "q")
    tx_pass, fused, site = lower(MultiHeadAttentionBsh, model)
    assert site["op"] == MHA and tx_pass.rule_counts["query-merge-heads"] == 1
    assert max_diff(model, fused, feeds()) < ATOL


def test_query_merge_refuses_a_query_the_graph_has_merged():
    _, _, reading = read_state(attention_block())
    assert QueryMergeHeads().check(reading) == "Q is already [B, S, hidden] in the graph"


def test_query_merge_keeps_the_head_split_query_read_elsewhere():
    model = add_output(heads_first(attention_block(), "q"), "q4")
    tx_pass, fused, site = lower(MultiHeadAttentionBsh, model)
    assert tx_pass.rule_counts["query-merge-heads"] == 1 and "q4" in [o.name for o in fused.graph.output]
    assert max_diff(model, fused, feeds()) < ATOL


@pytest.mark.parametrize("seq", [3, 11])
def test_lowerings_bake_in_no_probe_size(seq):
    """Each lowering's graph runs at other sizes than the probe's (GQA needs its causal size)."""
    for rule, flags in [(MultiHeadAttentionBnsh, {}), (PackedMatMul, {"precision": "int8"})]:
        model = heads_first(attention_block(), "k") if rule is MultiHeadAttentionBnsh else attention_block()
        _, fused, _ = lower(rule, model, flags)
        assert max_diff(model, fused, feeds(batch=3, seq=seq)) < ATOL


# soft-cap (Gemma 2): GroupQueryAttention and ONNX Attention cap the scores, MultiHeadAttention cannot


def test_soft_capped_site_becomes_onnx_attention_with_its_softcap():
    model = attention_block(softcap=2.0)
    tx_pass, fused = run_pass(FuseAttention, model, {"attention_op": "onnx"})
    (site,) = tx_pass.details["sites"]
    assert (site["status"], site["op"]) == ("fused", "Attention")
    (node,) = [n for n in fused.graph.node if n.op_type == "Attention"]
    assert {a.name: a.f for a in node.attribute}["softcap"] == 2.0
    assert max_diff(model, fused, feeds()) < ATOL
    assert max_diff(model, attention_block(), feeds()) > 0.1  # the cap matters on these inputs


def test_a_soft_capped_site_is_onnx_attention_on_the_cpu():
    model = attention_block(softcap=2.0)
    tx_pass, fused = run_pass(FuseAttention, model)
    (site,) = tx_pass.details["sites"]
    assert (site["status"], site["rule"], site["op"]) == ("fused", "onnx-attention-bsh", "Attention")
    (node,) = [n for n in fused.graph.node if n.op_type == "Attention"]
    assert {a.name: a.f for a in node.attribute}["softcap"] == 2.0
    assert max_diff(model, fused, feeds()) < ATOL


def test_multi_head_attention_refuses_a_soft_capped_site():
    model = attention_block(softcap=2.0)
    tx_pass, fused = run_pass(FuseAttention, model, target="gpu")
    (site,) = tx_pass.details["sites"]
    assert site["status"] == "unfused"
    assert site["reason"] == (
        "soft-capped scores (2·tanh(s/2)): com.microsoft.MultiHeadAttention has no softcap; "
        "GroupQueryAttention and ONNX Attention do (--attention-op gqa / onnx)"
    )
    assert "Softmax" in op_types(fused) and max_diff(model, fused, feeds()) == 0


def test_soft_cap_read_elsewhere_keeps_the_site():
    model = add_output(attention_block(softcap=2.0), "tanh")
    tx_pass, _ = run_pass(FuseAttention, model, {"attention_op": "onnx"})
    (site,) = tx_pass.details["sites"]
    assert site["status"] == "unfused" and site["reason"] == "score tensor tanh has another consumer"
