"""split-folded-heads: attention over heads folded into the batch axis (BLOOM's baddbmm with
ALiBi) is split back into heads, then fused like any site; per rule and on BLOOM itself."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from txcompile.passes.attention.fusion import FuseAttention

from .graphs import (
    BATCH,
    HEAD_DIM,
    HEADS,
    HIDDEN,
    MIN,
    SEQ,
    checked_model,
    feeds,
    max_diff,
    op_types,
    run_pass,
)

SLOPES = 2.0 ** -np.arange(1, HEADS + 1)  # ALiBi's per-head slopes


def folded_block(term: str = "alibi", extra_output: str | None = None) -> onnx.ModelProto:
    """x [B, S, hidden] → BLOOM's attention: Q·Kᵀ over [B·N] batches, ALiBi added there, the
    scores viewed as [B, N, S, L] for the padding mask, viewed back for P·V.

    ``term``: "alibi" ([B·N, 1, L], from the mask's positions), "matrix" (a [S, L] constant,
    which does not fold with the heads), "none".
    """
    rng = np.random.default_rng(0)
    inits, nodes = [], []

    def const(name, array):
        inits.append(numpy_helper.from_array(np.asarray(array), name))
        return name

    def node(op, inputs, output, **attributes):
        nodes.append(helper.make_node(op, inputs, [output], **attributes))
        return output

    const("split", np.array([0, 0, HEADS, HEAD_DIM], np.int64))
    const("minus_one", np.array([-1], np.int64))
    for name in ("q", "k", "v"):
        const(f"w_{name}", rng.standard_normal((HIDDEN, HIDDEN)).astype(np.float32) / 4)
        projected = node("MatMul", ["x", f"w_{name}"], f"{name}_proj")
        split = node("Reshape", [projected, "split"], f"{name}_split")
        heads4 = node("Transpose", [split], f"{name}4", perm=[0, 2, 1, 3])  # [B, N, S, D]
        rows = node("Shape", [heads4], f"{name}_rows", start=2)
        target = node("Concat", ["minus_one", rows], f"{name}_folded_shape", axis=0)
        node("Reshape", [heads4, target], f"{name}3")  # [B·N, S, D]
    key_t = node("Transpose", ["k3"], "k3_t", perm=[0, 2, 1])
    scores = node("MatMul", ["q3", key_t], "scores3")
    scores = node("Mul", [scores, const("scale", np.array(HEAD_DIM**-0.5, np.float32))], "scaled3")
    if term == "alibi":  # slopes[h] · position of each key, as BLOOM's build_alibi_tensor
        mask_f = node("Cast", ["attention_mask"], "mask_f", to=TensorProto.FLOAT)
        positions = node("CumSum", [mask_f, const("axis1", np.array(1, np.int64))], "positions")
        positions = node("Sub", [positions, const("one", np.array(1.0, np.float32))], "positions0")
        positions = node("Mul", [positions, mask_f], "positions_masked")
        positions = node("Unsqueeze", [positions, const("axes1", np.array([1], np.int64))], "positions3")
        alibi = node(
            "Mul", [const("slopes", SLOPES.reshape(HEADS, 1).astype(np.float32)), positions], "alibi"
        )
        length = node("Shape", ["attention_mask"], "mask_length", start=1)
        target = node(
            "Concat", [const("rows_one", np.array([-1, 1], np.int64)), length], "alibi_shape", axis=0
        )
        scores = node("Add", [scores, node("Reshape", [alibi, target], "alibi3")], "biased3")
    elif term == "matrix":
        matrix = const("matrix", rng.standard_normal((SEQ, SEQ)).astype(np.float32))
        scores = node("Add", [scores, matrix], "biased3")
    batch_heads_seq = node("Shape", ["q4"], "q4_bns", end=3)
    keys = node("Shape", ["k4"], "k4_l", start=2, end=3)
    view_shape = node("Concat", [batch_heads_seq, keys], "view_shape", axis=0)
    scores = node("Reshape", [scores, view_shape], "scores4")  # [B, N, S, L]
    mask4 = node("Unsqueeze", ["attention_mask", const("axes12", np.array([1, 2], np.int64))], "mask4")
    mask_b = node("Cast", [mask4], "mask_b", to=TensorProto.BOOL)
    scores = node("Where", [mask_b, scores, const("fill", np.array(MIN, np.float32))], "masked")
    probs = node("Softmax", [scores], "probs", axis=-1)
    back = node("Reshape", [probs, node("Shape", ["scores3"], "scores3_shape")], "probs3")
    context = node("MatMul", [back, "v3"], "context3")
    context = node("Reshape", [context, node("Shape", ["q4"], "q4_shape")], "context4")
    context = node("Transpose", [context], "context_t", perm=[0, 2, 1, 3])
    node("Reshape", [context, const("merge", np.array([0, 0, HIDDEN], np.int64))], "y")
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", "seq", HIDDEN])]
    if extra_output:
        outputs.append(helper.make_tensor_value_info(extra_output, TensorProto.FLOAT, ["bn", "seq", "keys"]))
    graph = helper.make_graph(
        nodes,
        "folded",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "seq", HIDDEN]),
            helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch", "seq"]),
        ],
        outputs,
        inits,
    )
    return checked_model(graph)


def test_folded_site_with_alibi_is_split_and_fused():
    model = folded_block()
    tx_pass, fused = run_pass(FuseAttention, model)
    assert tx_pass.rule_counts["split-folded-heads"] == 1
    (site,) = tx_pass.details["sites"]
    # the three projections pack into one Attention op; ALiBi's per-head bias is its attention bias
    assert (site["status"], site["op"]) == ("fused", "com.microsoft.Attention"), site
    assert site["bias"] == ["add", "fill-false"]  # ALiBi, then the padding mask
    assert not {"Softmax", "MatMul"} & set(op_types(fused))
    for batch, seq in ((BATCH, SEQ), (3, SEQ)):  # not only the probe's batch
        assert max_diff(model, fused, feeds(batch, seq)) < 1e-5
    folded = {"scores3", "scaled3", "biased3", "context3"}
    assert not folded & {o for n in fused.graph.node for o in n.output}  # the folded chain is gone


def test_term_that_does_not_fold_with_the_heads_keeps_the_site_with_the_reason():
    model = folded_block(term="matrix")
    tx_pass, fused = run_pass(FuseAttention, model)
    assert "split-folded-heads" not in tx_pass.rule_counts
    (site,) = tx_pass.details["sites"]
    assert site["status"] == "unfused"
    assert site["reason"] == (
        f"heads folded into the batch: a term added to the folded scores is ({SEQ}, {SEQ}), not [B·N, S, L]"
    )
    assert op_types(fused) == op_types(model)
    assert max_diff(model, fused, feeds()) < 1e-5


@pytest.mark.parametrize("shared", ["scaled3", "biased3"])
def test_folded_scores_read_elsewhere_keep_the_site_with_the_reason(shared):
    model = folded_block(extra_output=shared)
    tx_pass, fused = run_pass(FuseAttention, model)
    assert "split-folded-heads" not in tx_pass.rule_counts
    (site,) = tx_pass.details["sites"]
    assert site["reason"] == f"heads folded into the batch: score tensor {shared} has another consumer"
    assert max_diff(model, fused, feeds()) < 1e-5
