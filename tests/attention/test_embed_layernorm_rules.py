"""EmbedLayerNormRule (embed-layer-norm): a match, a non-match with its reason, shared values.

Every site lands in ``details["sites"]`` as the shared record (site, rule, status, op, reason).
"""

from __future__ import annotations

import onnx
from onnx import TensorProto, helper

from txcompile.passes.attention.embed_layernorm import SHAPE_READERS, EmbedLayerNormRule, FuseEmbedLayerNorm

from .graphs import max_diff, op_types, run_pass
from .test_embed_layernorm import HIDDEN, embedding_block, embedding_feeds

KEYS = {"site", "rule", "status", "op", "reason"}


def _tags(model: onnx.ModelProto) -> dict[str, set[str]]:
    tags: dict[str, set[str]] = {}
    for node in model.graph.node:
        for prop in node.metadata_props:
            if prop.key == "txcompile.rule":
                tags.setdefault(prop.value, set()).add(node.op_type)
    return tags


def test_match_is_a_fused_shared_record_tagged_with_the_rule():
    model = embedding_block()
    tx_pass, fused = run_pass(FuseEmbedLayerNorm, model, context_feeds=embedding_feeds())
    (site,) = tx_pass.details["sites"]
    assert set(site) == KEYS
    assert site == {
        "site": "normed",
        "rule": EmbedLayerNormRule.name,
        "status": "fused",
        "op": "EmbedLayerNormalization",
        "reason": None,
    }
    assert tx_pass.rule_counts == {"embed-layer-norm": 1}
    assert "EmbedLayerNormalization" in _tags(fused)["embed-layer-norm"]
    assert max_diff(model, fused, embedding_feeds(batch=3, seq=11)) < 1e-5


def test_shape_reader_of_a_lookup_is_rebuilt_from_the_indices():
    """TorchScript takes the sequence length from the embedded tensor: Shape(W[ids])."""
    model = embedding_block()
    model.graph.node.append(helper.make_node("Shape", ["word_emb"], ["emb_dims"], start=1))
    model.graph.node.append(helper.make_node("Identity", ["emb_dims"], ["emb_shape"]))
    model.graph.output.append(helper.make_tensor_value_info("emb_shape", TensorProto.INT64, [2]))
    tx_pass, fused = run_pass(FuseEmbedLayerNorm, model, context_feeds=embedding_feeds())
    assert [s["status"] for s in tx_pass.details["sites"]] == ["fused"]
    assert op_types(fused).count("Gather") == 1  # the lookups are gone (left: the seq-length Gather)
    assert _tags(fused)[SHAPE_READERS] == {"Shape", "Concat", "Slice"}
    assert max_diff(model, fused, embedding_feeds(batch=3, seq=13)) < 1e-5


def test_index_shapes_that_do_not_fit_are_refused_with_the_reason():
    model = embedding_block()
    types = next(i for i in model.graph.input if i.name == "token_type_ids")
    types.type.tensor_type.shape.dim[1].dim_value = 1  # one token type per row, broadcast over S
    feeds = embedding_feeds()
    feeds["token_type_ids"] = feeds["token_type_ids"][:, :1]
    tx_pass, fused = run_pass(FuseEmbedLayerNorm, model, context_feeds=feeds)
    assert "EmbedLayerNormalization" not in op_types(fused)
    (site,) = tx_pass.details["sites"]
    assert (site["rule"], site["status"], site["op"]) == ("embed-layer-norm", "unfused", None)
    assert site["reason"] == "the lookups' index shapes do not fit (ids [B, S], positions [1|B, S])"


def test_partial_sum_read_elsewhere_is_refused_and_the_graph_stays():
    model = embedding_block()
    model.graph.output.append(
        helper.make_tensor_value_info("partial", TensorProto.FLOAT, ["batch", "seq", HIDDEN])
    )
    tx_pass, fused = run_pass(FuseEmbedLayerNorm, model, context_feeds=embedding_feeds())
    assert [s["reason"] for s in tx_pass.details["sites"]] == ["an intermediate value has another consumer"]
    assert op_types(fused) == op_types(model) and not tx_pass.rule_counts
    assert max_diff(model, fused, embedding_feeds()) == 0


def test_sum_read_by_the_residual_is_kept_and_fused():
    model = embedding_block(residual_reader=True)
    tx_pass, fused = run_pass(FuseEmbedLayerNorm, model, context_feeds=embedding_feeds())
    assert [s["status"] for s in tx_pass.details["sites"]] == ["fused"]
    assert max_diff(model, fused, embedding_feeds(batch=3, seq=19)) < 1e-5


def test_embedding_sum_as_graph_output_is_refused():
    model = embedding_block(residual_reader=True)
    shape = ["batch", "seq", HIDDEN]
    model.graph.output.append(helper.make_tensor_value_info("embedded", TensorProto.FLOAT, shape))
    tx_pass, fused = run_pass(FuseEmbedLayerNorm, model, context_feeds=embedding_feeds())
    assert [s["reason"] for s in tx_pass.details["sites"]] == ["the embedding sum is a graph output"]
    assert "EmbedLayerNormalization" not in op_types(fused)
    assert max_diff(model, fused, embedding_feeds()) == 0
