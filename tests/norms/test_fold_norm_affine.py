"""fold-norm-affine: a norm read only by linear layers hands its scale and shift to them."""

from __future__ import annotations

import numpy as np
import pytest
from onnx import helper

from tests.norms import models

D = 8
RNG = np.random.default_rng(2)
CONSTS = {
    "g": 1 + 0.2 * RNG.standard_normal(D),
    "b": 0.2 * RNG.standard_normal(D),
    "w": RNG.standard_normal((D, 6)),
    "wt": RNG.standard_normal((6, D)),
    "c": RNG.standard_normal(6),
}
X = [("x", ["batch", "seq", D])]


def norm(op="LayerNormalization"):
    inputs = ["x", "g", "b"] if op == "LayerNormalization" else ["x", "g"]
    return helper.make_node(op, inputs, ["n"], axis=-1, epsilon=1e-5)


def fold(nodes, outputs, op="LayerNormalization"):
    model = models.graph_model([norm(op), *nodes], X, outputs, CONSTS, opset=23)
    out, records = models.optimize(model, ["fold-norm-affine"], cleanup=False)
    return out, records["fold-norm-affine"]


@pytest.mark.parametrize("op", ["LayerNormalization", "RMSNormalization"])
def test_matmul_and_gemm_readers_take_the_affine(op):
    nodes = [
        helper.make_node("MatMul", ["n", "w"], ["m"]),
        helper.make_node("Add", ["m", "c"], ["y1"]),
        helper.make_node("Reshape", ["n", "flat"], ["n2"]),
        helper.make_node("Gemm", ["n2", "wt"], ["y2"], transB=1),
        helper.make_node("MatMul", ["n", "w"], ["y3"]),  # no bias yet, and a graph output
    ]
    CONSTS["flat"] = np.array([-1, D])
    outputs = [("y1", ["batch", "seq", 6]), ("y2", [None, 6]), ("y3", ["batch", "seq", 6])]
    out, record = fold(nodes, outputs, op)
    assert record["status"] == "applied", record["details"]
    assert record["rule_counts"] == {f"fold-{op}": 1}
    assert record["max_diff"] <= 1e-4
    norm_node = next(n for n in out.graph.node if n.op_type == op)
    gamma = next(i for i in out.graph.initializer if i.name == norm_node.input[1])
    assert np.all(np.frombuffer(gamma.raw_data, np.float32) == 1) and len(norm_node.input) == 2


def test_non_linear_reader_keeps_the_affine():
    out, record = fold([helper.make_node("Gelu", ["n"], ["y"])], [("y", ["batch", "seq", D])])
    assert record["status"] == "unchanged"
    assert "Gelu" in models.unfused(record)[0]["reason"]


def test_norm_output_also_read_by_residual_add_is_left():
    nodes = [
        helper.make_node("MatMul", ["n", "w"], ["y1"]),
        helper.make_node("Add", ["n", "x"], ["y2"]),
    ]
    _, record = fold(nodes, [("y1", ["batch", "seq", 6]), ("y2", ["batch", "seq", D])])
    assert record["status"] == "unchanged"
    assert "Add" in models.unfused(record)[0]["reason"]


def test_vit_after_fusion_folds_every_linear_read_norm():
    model = models.exported("vit", "torchscript")
    _, records = models.optimize(model, ["fuse-norms", "fold-norm-affine"])
    record = records["fold-norm-affine"]
    assert record["status"] == "applied" and record["max_diff"] <= 1e-4
    assert sum(record["rule_counts"].values()) == 4  # both norms of both layers; the final one is an output
    assert any("graph output" in left["reason"] for left in models.unfused(record))
