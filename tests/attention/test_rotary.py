"""fuse-rotary on hand-built RoPE blocks: fuse, refuse (with the reason), keep shared values."""

from __future__ import annotations

import numpy as np
from onnx import TensorProto, helper, numpy_helper

from txcompile.passes.attention.rotary import FuseRotary

from .graphs import checked_model, max_diff, op_types, run_pass

HEADS, HEAD_DIM = 3, 8


def rope_block(*, shared_angles: bool = True, first_half: int = HEAD_DIM // 2, extra_output: bool = False):
    """x [B, heads, S, head_dim], angles θ [1|B, S, head_dim/2] → x·cos + rotate_half(x)·sin, then Neg.

    cos/sin = Unsqueeze(Cos/Sin(Concat(θ, θ)), 1), as Hugging Face's LLaMA writes them.
    """
    inits = [
        numpy_helper.from_array(np.array(v, np.int64), n)
        for n, v in {
            "zero": [0],
            "split": [first_half],
            "big": [2**62],
            "last": [-1],
            "heads_axis": [1],
        }.items()
    ]
    nodes = [
        helper.make_node("Concat", ["angles", "angles"], ["theta"], axis=-1),
        helper.make_node("Cos", ["theta"], ["cos_raw"]),
        helper.make_node("Sin", ["theta"], ["sin_raw"]),
        helper.make_node("Unsqueeze", ["cos_raw", "heads_axis"], ["cos"]),
        helper.make_node("Unsqueeze", ["sin_raw", "heads_axis"], ["sin"]),
        helper.make_node("Slice", ["x", "zero", "split", "last"], ["x1"]),
        helper.make_node("Slice", ["x", "split", "big", "last"], ["x2"]),
        helper.make_node("Neg", ["x2"], ["neg_x2"]),
        helper.make_node("Concat", ["neg_x2", "x1"], ["rotated"], axis=-1),
        helper.make_node("Mul", ["x", "cos"], ["x_cos"]),
        helper.make_node("Mul", ["rotated", "sin"], ["rotated_sin"]),
        helper.make_node("Add", ["x_cos", "rotated_sin"], ["embedded"]),
        helper.make_node("Neg", ["embedded"], ["y"]),
    ]
    batch = "batch" if not shared_angles else 1
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", HEADS, "seq", HEAD_DIM])]
    if extra_output:
        outputs.append(
            helper.make_tensor_value_info("rotated", TensorProto.FLOAT, ["batch", HEADS, "seq", HEAD_DIM])
        )
    graph = helper.make_graph(
        nodes,
        "rope",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", HEADS, "seq", HEAD_DIM]),
            helper.make_tensor_value_info("angles", TensorProto.FLOAT, [batch, "seq", HEAD_DIM // 2]),
        ],
        outputs,
        inits,
    )
    return checked_model(graph)


def rope_feeds(batch: int = 2, seq: int = 5, shared_angles: bool = True) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(batch * 100 + seq)
    angles_batch = 1 if shared_angles else batch
    return {
        "x": rng.standard_normal((batch, HEADS, seq, HEAD_DIM)).astype(np.float32),
        "angles": rng.uniform(-3, 3, (angles_batch, seq, HEAD_DIM // 2)).astype(np.float32),
    }


def _reasons(tx_pass) -> list[str | None]:
    return [site["reason"] for site in tx_pass.details["sites"]]


def test_rope_becomes_rotary_embedding_at_every_length():
    model = rope_block()
    tx_pass, fused = run_pass(FuseRotary, model, context_feeds=rope_feeds())
    assert op_types(fused).count("RotaryEmbedding") == 1
    assert not {"Cos", "Sin"} - set(op_types(fused))  # the graph's own cos/sin feed the op's cache
    assert "Neg" in op_types(fused) and op_types(fused).count("Neg") == 1  # only the final one
    assert _reasons(tx_pass) == [None] and tx_pass.rule_counts["rotary-embedding"] == 1
    # other batch and sequence sizes than the probe's: nothing sized was baked in
    assert max_diff(model, fused, rope_feeds(batch=3, seq=17)) < 1e-5
    node = next(n for n in fused.graph.node if n.op_type == "RotaryEmbedding")
    assert node.domain == "com.microsoft"
    assert {a.name: helper.get_attribute_value(a) for a in node.attribute} == {
        "interleaved": 0,
        "num_heads": 3,
    }


def test_halves_that_are_not_halves_are_refused():
    tx_pass, fused = run_pass(FuseRotary, rope_block(first_half=3), context_feeds=rope_feeds())
    assert "RotaryEmbedding" not in op_types(fused)
    assert "partial rotary, or not halves" in _reasons(tx_pass)[0]


def test_angles_per_batch_row_index_their_own_rows():
    """A decoder with a cache takes position ids, so every row has its own angles: the cache is
    cos/sin flattened per (row, position) and the position ids index each row's own part."""
    model = rope_block(shared_angles=False)
    tx_pass, fused = run_pass(FuseRotary, model, context_feeds=rope_feeds(shared_angles=False))
    assert op_types(fused).count("RotaryEmbedding") == 1 and _reasons(tx_pass) == [None]
    assert max_diff(model, fused, rope_feeds(batch=3, seq=17, shared_angles=False)) < 1e-5


def test_shared_intermediate_is_not_fused():
    tx_pass, fused = run_pass(FuseRotary, rope_block(extra_output=True), context_feeds=rope_feeds())
    assert "RotaryEmbedding" not in op_types(fused)
    assert _reasons(tx_pass) == ["an intermediate value has another consumer"]


def test_head_split_input_is_rotated_before_the_split():
    """x = Transpose(Reshape(x3 [B, S, N·D])): RotaryEmbedding takes x3 itself (num_heads set) and
    the heads are split after it, so a fused attention reads the rotated [B, S, hidden] directly."""
    model = rope_block()
    shape = helper.make_tensor("heads", TensorProto.INT64, [4], [0, 0, HEADS, HEAD_DIM])
    split = [
        helper.make_node("Reshape", ["x3", "heads"], ["x4"]),
        helper.make_node("Transpose", ["x4"], ["x"], perm=[0, 2, 1, 3]),
    ]
    graph = model.graph
    graph.initializer.append(shape)
    nodes = [*split, *graph.node]
    del graph.node[:]
    graph.node.extend(nodes)
    graph.input[0].CopyFrom(
        helper.make_tensor_value_info("x3", TensorProto.FLOAT, ["batch", "seq", HEADS * HEAD_DIM])
    )
    model = checked_model(graph)

    def split_feeds(batch, seq):
        feeds = rope_feeds(batch, seq)
        return {"x3": feeds.pop("x").transpose(0, 2, 1, 3).reshape(batch, seq, -1), **feeds}

    tx_pass, fused = run_pass(FuseRotary, model, context_feeds=split_feeds(2, 5))
    (rotary,) = [n for n in fused.graph.node if n.op_type == "RotaryEmbedding"]
    assert rotary.input[0] == "x3"
    assert {a.name: a.i for a in rotary.attribute}["num_heads"] == HEADS
    assert max_diff(model, fused, split_feeds(3, 7)) < 1e-5
