"""fuse-embed-layernorm on hand-built embedding blocks: fuse, keep the sum for Pre-LN readers,
refuse shared intermediates."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from txcompile.passes.attention.embed_layernorm import FuseEmbedLayerNorm

from .graphs import checked_model, max_diff, op_types, run_pass

VOCAB, POSITIONS, TYPES, HIDDEN = 50, 32, 2, 16


def embedding_block(*, residual_reader: bool = False, lookup_read_elsewhere: bool = False) -> onnx.ModelProto:
    """input_ids, token_type_ids [B, S] → LayerNorm(W[ids] + P[arange(S)] + T[types]) → MatMul.

    Positions come from Slice(buffer, 0, S), as the exporters write BERT's position_ids.
    ``residual_reader``: the sum is also added to the block's output (Pre-LN, as in GPT-2).
    """
    rng = np.random.default_rng(0)
    tables = {
        "words": rng.standard_normal((VOCAB, HIDDEN)),
        "positions": rng.standard_normal((POSITIONS, HIDDEN)),
        "types": rng.standard_normal((TYPES, HIDDEN)),
        "gamma": 1 + 0.1 * rng.standard_normal(HIDDEN),
        "beta": 0.1 * rng.standard_normal(HIDDEN),
        "proj": rng.standard_normal((HIDDEN, HIDDEN)) / 4,
    }
    inits = [numpy_helper.from_array(v.astype(np.float32), k) for k, v in tables.items()]
    ints = {"position_buffer": np.arange(POSITIONS)[None, :], "zero": [0], "one": [1], "index1": [1]}
    inits += [numpy_helper.from_array(np.asarray(v, np.int64), k) for k, v in ints.items()]
    nodes = [
        helper.make_node("Shape", ["input_ids"], ["ids_shape"]),
        helper.make_node("Gather", ["ids_shape", "index1"], ["seq"], axis=0),
        helper.make_node("Slice", ["position_buffer", "zero", "seq", "one"], ["position_ids"]),
        helper.make_node("Gather", ["words", "input_ids"], ["word_emb"]),
        helper.make_node("Gather", ["positions", "position_ids"], ["position_emb"]),
        helper.make_node("Gather", ["types", "token_type_ids"], ["type_emb"]),
        helper.make_node("Add", ["word_emb", "type_emb"], ["partial"]),
        helper.make_node("Add", ["partial", "position_emb"], ["embedded"]),
        helper.make_node("LayerNormalization", ["embedded", "gamma", "beta"], ["normed"], epsilon=1e-12),
        helper.make_node("MatMul", ["normed", "proj"], ["projected"]),
    ]
    output = "projected"
    if residual_reader:
        nodes.append(helper.make_node("Add", ["projected", "embedded"], ["residual"]))
        output = "residual"
    outputs = [helper.make_tensor_value_info(output, TensorProto.FLOAT, ["batch", "seq", HIDDEN])]
    if lookup_read_elsewhere:
        outputs.append(helper.make_tensor_value_info("word_emb", TensorProto.FLOAT, ["batch", "seq", HIDDEN]))
    graph = helper.make_graph(
        nodes,
        "embeddings",
        [
            helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "seq"]),
            helper.make_tensor_value_info("token_type_ids", TensorProto.INT64, ["batch", "seq"]),
        ],
        outputs,
        inits,
    )
    return checked_model(graph)


def embedding_feeds(batch: int = 2, seq: int = 7) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(batch * 100 + seq)
    return {
        "input_ids": rng.integers(0, VOCAB, (batch, seq)).astype(np.int64),
        "token_type_ids": rng.integers(0, TYPES, (batch, seq)).astype(np.int64),
    }


def test_embedding_block_becomes_one_op():
    model = embedding_block()
    tx_pass, fused = run_pass(FuseEmbedLayerNorm, model, context_feeds=embedding_feeds())
    assert op_types(fused).count("EmbedLayerNormalization") == 1
    assert not {"LayerNormalization", "Add"} & set(op_types(fused))
    assert tx_pass.details["sites"][0]["status"] == "fused"
    assert max_diff(model, fused, embedding_feeds(batch=3, seq=19)) < 1e-5


def test_pre_ln_residual_reads_the_embedding_sum_output():
    model = embedding_block(residual_reader=True)
    _, fused = run_pass(FuseEmbedLayerNorm, model, context_feeds=embedding_feeds())
    node = next(n for n in fused.graph.node if n.op_type == "EmbedLayerNormalization")
    residual = next(n for n in fused.graph.node if n.op_type == "Add")
    assert node.output[2] in residual.input  # the sum comes out of the fused op, not recomputed
    assert max_diff(model, fused, embedding_feeds(batch=3, seq=19)) < 1e-5


def test_lookup_read_elsewhere_is_not_fused():
    model = embedding_block(lookup_read_elsewhere=True)
    tx_pass, fused = run_pass(FuseEmbedLayerNorm, model, context_feeds=embedding_feeds())
    assert "EmbedLayerNormalization" not in op_types(fused)
    assert tx_pass.details["sites"][0]["reason"] == "an intermediate value has another consumer"


def test_norm_of_anything_else_is_not_a_site():
    model = embedding_block()
    # the position table now arrives through a node: a computed table is not an embedding lookup
    model.graph.node.insert(0, helper.make_node("Identity", ["positions"], ["positions_copy"]))
    model.graph.node[5].input[0] = "positions_copy"
    tx_pass, fused = run_pass(FuseEmbedLayerNorm, model, context_feeds=embedding_feeds())
    assert "EmbedLayerNormalization" not in op_types(fused) and tx_pass.details["sites"] == []
