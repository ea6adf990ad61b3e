"""RotaryRule (rotary-embedding): a match, non-matches with their reasons, shared intermediates.

Every site lands in ``details["sites"]`` as the shared record (site, rule, status, op, reason).
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from txcompile.passes.attention.rotary import FuseRotary, RotaryRule

from .graphs import checked_model, max_diff, op_types, run_pass
from .test_rotary import HEAD_DIM, HEADS, rope_block, rope_feeds

KEYS = {"site", "rule", "status", "op", "reason"}


def _tags(model: onnx.ModelProto) -> dict[str, str]:
    return {
        n.op_type: p.value for n in model.graph.node for p in n.metadata_props if p.key == "txcompile.rule"
    }


def _with_extra_output(model: onnx.ModelProto, value: str) -> onnx.ModelProto:
    shape = ["batch", HEADS, "seq", HEAD_DIM]
    model.graph.output.append(helper.make_tensor_value_info(value, TensorProto.FLOAT, shape))
    return model


def two_sites() -> onnx.ModelProto:
    """Q and K rotated by the same cos/sin, as every LLaMA layer does: one cache for both."""
    model = rope_block()
    x_nodes = [n for n in model.graph.node if n.output[0] in {"x1", "x2", "neg_x2", "rotated", "x_cos"}]
    x_nodes += [n for n in model.graph.node if n.output[0] in {"rotated_sin", "embedded"}]
    rename = {name: f"k_{name}" for n in x_nodes for name in n.output} | {"x": "k"}
    for node in x_nodes:
        copy = onnx.NodeProto()
        copy.CopyFrom(node)
        copy.input[:] = [rename.get(i, i) for i in node.input]
        copy.output[:] = [rename[o] for o in node.output]
        model.graph.node.append(copy)
    model.graph.node.append(helper.make_node("Add", ["y", "k_embedded"], ["both"]))
    shape = ["batch", HEADS, "seq", HEAD_DIM]
    model.graph.input.append(helper.make_tensor_value_info("k", TensorProto.FLOAT, shape))
    model.graph.output[0].CopyFrom(helper.make_tensor_value_info("both", TensorProto.FLOAT, shape))
    onnx.checker.check_model(model)
    return model


def _two_feeds(batch: int = 2, seq: int = 5):
    feeds = rope_feeds(batch, seq)
    return {**feeds, "k": feeds["x"][:, :, :, ::-1].copy()}


def test_match_is_a_fused_shared_record_tagged_with_the_rule():
    model = rope_block()
    tx_pass, fused = run_pass(FuseRotary, model, context_feeds=rope_feeds())
    (site,) = tx_pass.details["sites"]
    assert set(site) == KEYS
    assert site == {
        "site": "embedded",
        "rule": RotaryRule.name,
        "status": "fused",
        "op": "RotaryEmbedding",
        "reason": None,
    }
    assert (tx_pass.details["fused"], tx_pass.details["unfused"]) == (1, 0)
    assert _tags(fused)["RotaryEmbedding"] == "rotary-embedding"
    assert max_diff(model, fused, rope_feeds(batch=3, seq=11)) < 1e-5


def test_q_and_k_share_one_cos_sin_cache():
    model = two_sites()
    tx_pass, fused = run_pass(FuseRotary, model, context_feeds=_two_feeds())
    assert tx_pass.rule_counts == {"rotary-embedding": 2}
    assert op_types(fused).count("RotaryEmbedding") == 2
    assert op_types(fused).count("Slice") == 2  # cos[..., :h] and sin[..., :h], once for both sites
    assert max_diff(model, fused, _two_feeds(batch=3, seq=9)) < 1e-5


def test_a_one_row_verification_batch_indexes_the_angles_per_row():
    """One row cannot tell shared angles from per-row ones: the per-row form is exact for both."""
    model = rope_block(shared_angles=False)
    tx_pass, fused = run_pass(FuseRotary, model, context_feeds=rope_feeds(batch=1, shared_angles=False))
    (site,) = tx_pass.details["sites"]
    assert (site["rule"], site["status"], site["op"]) == ("rotary-embedding", "fused", "RotaryEmbedding")
    assert max_diff(model, fused, rope_feeds(batch=3, seq=7, shared_angles=False)) < 1e-5
    shared = rope_block()
    _, fused = run_pass(FuseRotary, shared, context_feeds=rope_feeds(batch=1))
    assert max_diff(shared, fused, rope_feeds(batch=3, seq=7)) < 1e-5


def test_partial_rotary_reason_names_the_slices():
    tx_pass, _ = run_pass(FuseRotary, rope_block(first_half=3), context_feeds=rope_feeds())
    (site,) = tx_pass.details["sites"]
    assert site["status"] == "unfused"
    assert site["reason"] == "the slices take (0, 3) and (3, 8) of 8 (partial rotary, or not halves)"


def test_product_read_elsewhere_is_refused_and_the_graph_stays():
    model = _with_extra_output(rope_block(), "x_cos")
    tx_pass, fused = run_pass(FuseRotary, model, context_feeds=rope_feeds())
    assert [s["reason"] for s in tx_pass.details["sites"]] == ["an intermediate value has another consumer"]
    assert op_types(fused) == op_types(model) and not tx_pass.rule_counts
    assert max_diff(model, fused, rope_feeds()) == 0


def test_rotated_value_as_graph_output_is_refused():
    model = _with_extra_output(rope_block(), "embedded")
    tx_pass, fused = run_pass(FuseRotary, model, context_feeds=rope_feeds())
    assert [s["reason"] for s in tx_pass.details["sites"]] == ["the rotated value is a graph output"]
    assert "RotaryEmbedding" not in op_types(fused)


# folded tables: a static export computes cos/sin at export time into constants -----------------

SEQ = 5


def folded_rope(*, halves_repeat: bool = True, extra_output: bool = False) -> onnx.ModelProto:
    """rope_block with cos/sin as [1, 1, S, head_dim] initializers, as a static export writes them."""
    model = rope_block(extra_output=extra_output)
    table_nodes = {"theta", "cos_raw", "sin_raw", "cos", "sin"}
    kept = [n for n in model.graph.node if n.output[0] not in table_nodes]
    del model.graph.node[:]
    model.graph.node.extend(kept)
    del model.graph.input[1]  # the angles
    theta = np.random.default_rng(0).uniform(-3, 3, (SEQ, HEAD_DIM // 2))
    theta = np.concatenate([theta, theta if halves_repeat else theta + 0.5], axis=-1)
    for name, table in (("cos", np.cos(theta)), ("sin", np.sin(theta))):
        model.graph.initializer.append(numpy_helper.from_array(table[None, None].astype(np.float32), name))
    for value in (*model.graph.input, *model.graph.output):
        value.type.tensor_type.shape.dim[2].dim_value = SEQ
    onnx.checker.check_model(model)
    return model


def _static_feeds():
    return {"x": rope_feeds(batch=2, seq=SEQ)["x"]}


def test_folded_tables_whose_halves_repeat_become_rotary_embedding():
    model = folded_rope()
    tx_pass, fused = run_pass(FuseRotary, model, context_feeds=_static_feeds())
    (site,) = tx_pass.details["sites"]
    assert (site["status"], site["op"]) == ("fused", "RotaryEmbedding")
    assert max_diff(model, fused, _static_feeds()) < 1e-5


def test_folded_tables_whose_halves_differ_are_refused():
    model = folded_rope(halves_repeat=False)
    tx_pass, fused = run_pass(FuseRotary, model, context_feeds=_static_feeds())
    (site,) = tx_pass.details["sites"]
    assert site["status"] == "unfused"
    assert site["reason"] == "the folded cos/sin tables' two halves differ (not rotate_half's RoPE)"
    assert "RotaryEmbedding" not in op_types(fused)


def test_folded_tables_with_a_rotation_read_elsewhere_are_refused():
    model = folded_rope(extra_output=True)
    tx_pass, fused = run_pass(FuseRotary, model, context_feeds=_static_feeds())
    (site,) = tx_pass.details["sites"]
    assert site["reason"] == "an intermediate value has another consumer"
    assert max_diff(model, fused, _static_feeds()) == 0


# rotary-interleaved: GPT-J's rotate_every_two over repeat_interleave'd half tables ---------------

BIG = 2**63 - 1


def interleaved_rope(*, repeated: bool = True, extra_output: str | None = None) -> onnx.ModelProto:
    """x [B, S, heads, D] (rotated before the heads move, as GPT-J does), angles [B, S, D/2] →
    x·cos + rotate_every_two(x)·sin, then Neg; ``repeated=False`` builds cos/sin as
    Cos/Sin(Concat(θ, θ)), the half-split layout, which this rule does not read."""
    consts = {
        "one": [1],
        "zero": [0],
        "big": [BIG],
        "last": [-1],
        "two": [2],
        "heads_axis": [2],
        "pair": [1, 1, 1, 1, 2],
        "flat": [0, 0, 0, -1],
    }
    inits = [numpy_helper.from_array(np.array(v, np.int64), n) for n, v in consts.items()]
    nodes = []
    for trig in ("Cos", "Sin"):
        name = trig.lower()
        if repeated:
            nodes += [
                helper.make_node(trig, ["angles"], [f"{name}_h"]),
                helper.make_node("Unsqueeze", [f"{name}_h", "heads_axis"], [f"{name}_h4"]),
                helper.make_node("Unsqueeze", [f"{name}_h4", "last"], [f"{name}_h5"]),
                helper.make_node("Expand", [f"{name}_h5", "pair"], [f"{name}_pairs"]),
                helper.make_node("Reshape", [f"{name}_pairs", "flat"], [name]),
            ]
        else:
            nodes += [
                helper.make_node("Concat", ["angles", "angles"], [f"{name}_theta"], axis=-1),
                helper.make_node(trig, [f"{name}_theta"], [f"{name}_full"]),
                helper.make_node("Unsqueeze", [f"{name}_full", "heads_axis"], [name]),
            ]
    nodes += [
        helper.make_node("Slice", ["x", "one", "big", "last", "two"], ["odd"]),
        helper.make_node("Slice", ["x", "zero", "big", "last", "two"], ["even"]),
        helper.make_node("Neg", ["odd"], ["neg_odd"]),
        helper.make_node("Unsqueeze", ["neg_odd", "last"], ["neg_odd5"]),
        helper.make_node("Unsqueeze", ["even", "last"], ["even5"]),
        helper.make_node("Concat", ["neg_odd5", "even5"], ["pairs"], axis=-1),
        helper.make_node("Reshape", ["pairs", "flat"], ["rotated"]),
        helper.make_node("Mul", ["x", "cos"], ["x_cos"]),
        helper.make_node("Mul", ["rotated", "sin"], ["rotated_sin"]),
        helper.make_node("Add", ["x_cos", "rotated_sin"], ["embedded"]),
        helper.make_node("Neg", ["embedded"], ["y"]),
    ]
    shape = ["batch", "seq", HEADS, HEAD_DIM]
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, shape)]
    if extra_output:
        outputs.append(
            helper.make_tensor_value_info(extra_output, TensorProto.FLOAT, [*shape[:3], HEAD_DIM // 2, 2])
        )
    graph = helper.make_graph(
        nodes,
        "interleaved",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, shape),
            helper.make_tensor_value_info("angles", TensorProto.FLOAT, ["batch", "seq", HEAD_DIM // 2]),
        ],
        outputs,
        inits,
    )
    return checked_model(graph)


def _interleaved_feeds(batch: int = 2, seq: int = 5):
    rng = np.random.default_rng(batch * 10 + seq)
    return {
        "x": rng.standard_normal((batch, seq, HEADS, HEAD_DIM)).astype(np.float32),
        "angles": rng.uniform(-3, 3, (batch, seq, HEAD_DIM // 2)).astype(np.float32),
    }


def test_interleaved_rope_becomes_rotary_embedding_interleaved():
    model = interleaved_rope()
    tx_pass, fused = run_pass(FuseRotary, model, context_feeds=_interleaved_feeds())
    (site,) = [s for s in tx_pass.details["sites"] if s["rule"] == "rotary-interleaved"]
    assert (site["status"], site["op"]) == ("fused", "RotaryEmbedding")
    (node,) = [n for n in fused.graph.node if n.op_type == "RotaryEmbedding"]
    assert {a.name: helper.get_attribute_value(a) for a in node.attribute} == {
        "interleaved": 1,
        "num_heads": HEADS,
    }
    assert _tags(fused)["RotaryEmbedding"] == "rotary-interleaved"
    assert max_diff(model, fused, _interleaved_feeds(batch=3, seq=7)) < 1e-5  # other sizes too


def test_interleaved_rotation_over_half_split_tables_is_refused():
    model = interleaved_rope(repeated=False)
    tx_pass, fused = run_pass(FuseRotary, model, context_feeds=_interleaved_feeds())
    (site,) = [s for s in tx_pass.details["sites"] if s["rule"] == "rotary-interleaved"]
    assert (
        site["status"] == "unfused" and site["reason"] == "cos/sin are not repeat_interleave of half tables"
    )
    assert "RotaryEmbedding" not in op_types(fused)


def test_interleaved_pairs_read_elsewhere_are_refused():
    model = interleaved_rope(extra_output="pairs")
    tx_pass, fused = run_pass(FuseRotary, model, context_feeds=_interleaved_feeds())
    (site,) = [s for s in tx_pass.details["sites"] if s["rule"] == "rotary-interleaved"]
    assert site["reason"] == "an intermediate value has another consumer"
    assert max_diff(model, fused, _interleaved_feeds()) == 0
