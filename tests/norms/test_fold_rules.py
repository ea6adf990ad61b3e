"""fold-batchnorm and fold-norm-affine, rule by rule: a match, a non-match with its reason, a
shared intermediate. Per-rule reasons come from the rule's own check (fold-batchnorm records
only the last rule's reason for a BatchNorm that no rule folds)."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
from onnx import helper

from tests.norms import models
from tests.norms.test_fold_batchnorm import STATS, C, bn
from txcompile.graph.shapes import infer_shapes
from txcompile.passes.norms import (
    BatchNormLinear,
    ConvBatchNorm,
    LinearBatchNorm,
    LinearTransposedBatchNorm,
)
from txcompile.passes.norms.batchnorm import BnSite

RNG = np.random.default_rng(4)
CONSTS = {**STATS, "w2": RNG.standard_normal((C, 6)), "w3": RNG.standard_normal((6, C))}
N, T = ["batch", C], ["batch", "seq", C]


def bn_fold(nodes, inputs, outputs):
    model = models.graph_model(nodes, inputs, outputs, CONSTS)
    out, records = models.optimize(model, ["fold-batchnorm"], cleanup=False)
    return model, out, records["fold-batchnorm"]


def rule_reason(rule, model) -> str | None:
    graph = ir.serde.deserialize_model(model)
    infer_shapes(graph)
    node = next(n for n in graph.graph if n.op_type == "BatchNormalization")
    return rule().check(BnSite(node), None)


def folded(record, rule, op):
    assert record["status"] == "applied" and record["rule_counts"] == {rule: 1}
    assert record["max_diff"] <= 1e-4
    [site] = record["details"]["sites"]
    assert (site["rule"], site["status"], site["op"]) == (rule, "fused", op)


def left(record) -> str:
    assert record["status"] == "unchanged"
    [site] = models.unfused(record)
    assert site["rule"] == "fold-batchnorm"
    return site["reason"]


def conv(out="x"):
    return helper.make_node("Conv", ["img", "k", "kb"], [out], pads=[1, 1, 1, 1])


IMG, MAP = [("img", ["batch", 3, 8, 8])], ["batch", C, 8, 8]


# --- conv-batchnorm --------------------------------------------------------------------------


def test_conv_batchnorm_folds():
    _, out, record = bn_fold([conv(), bn()], IMG, [("y", MAP)])
    folded(record, "conv-batchnorm", "Conv")


def test_conv_batchnorm_after_relu_says_why():
    model, _, record = bn_fold([helper.make_node("Relu", ["a"], ["x"]), bn()], [("a", N)], [("y", N)])
    assert rule_reason(ConvBatchNorm, model) == "x is not written by a Conv that only the BatchNorm reads"
    assert "y is a graph output" in left(record)


def test_conv_batchnorm_with_the_conv_output_read_elsewhere_is_refused():
    nodes = [conv(), bn(), helper.make_node("Relu", ["x"], ["r"])]
    model, _, record = bn_fold(nodes, IMG, [("y", MAP), ("r", MAP)])
    assert rule_reason(ConvBatchNorm, model) == "x is not written by a Conv that only the BatchNorm reads"
    assert left(record) == "x is not written by a Conv or linear layer that only it reads"


# --- linear-batchnorm ------------------------------------------------------------------------


def test_linear_batchnorm_folds_into_gemm():
    _, _, record = bn_fold(
        [helper.make_node("Gemm", ["a", "w"], ["x"]), bn()], [("a", ["batch", 6])], [("y", N)]
    )
    folded(record, "linear-batchnorm", "Gemm")


def test_linear_batchnorm_after_relu_says_why():
    model, _, _ = bn_fold([helper.make_node("Relu", ["a"], ["x"]), bn()], [("a", N)], [("y", N)])
    assert rule_reason(LinearBatchNorm, model) == "x is not written by a MatMul / Gemm with constant weights"


def test_linear_batchnorm_with_the_linear_output_read_elsewhere_is_refused():
    nodes = [helper.make_node("Gemm", ["a", "w"], ["x"]), bn(), helper.make_node("Relu", ["x"], ["r"])]
    model, _, record = bn_fold(nodes, [("a", ["batch", 6])], [("y", N), ("r", N)])
    assert rule_reason(LinearBatchNorm, model) == "x is not a [N, C] value that only the BatchNorm reads"
    assert left(record) == "no linear layer writes it alone and y is a graph output"


# --- linear-transposed-batchnorm -------------------------------------------------------------


def transposed(extra=()):
    """MatMul [B, S, C] → Transpose → BN → Transpose → Relu (SLAB's BatchNorm over the hidden axis)."""
    return [
        helper.make_node("MatMul", ["a", "w"], ["m"]),
        helper.make_node("Transpose", ["m"], ["x"], perm=[0, 2, 1]),
        bn(),
        helper.make_node("Transpose", ["y"], ["tt"], perm=[0, 2, 1]),
        helper.make_node("Relu", ["tt"], ["z"]),
        *extra,
    ]


A3 = [("a", ["batch", "seq", 6])]


def test_linear_transposed_batchnorm_folds_and_drops_the_transposes():
    _, out, record = bn_fold(transposed(), A3, [("z", T)])
    folded(record, "linear-transposed-batchnorm", "MatMul")
    assert "Transpose" not in models.ops(out)


def test_linear_transposed_batchnorm_without_transposes_says_why():
    model, _, _ = bn_fold(
        [helper.make_node("Gemm", ["a", "w"], ["x"]), bn()], [("a", ["batch", 6])], [("y", N)]
    )
    assert rule_reason(LinearTransposedBatchNorm, model) == "it does not sit between two Transpose(0, 2, 1)"


def test_linear_transposed_batchnorm_with_the_projection_read_elsewhere_is_refused():
    model, out, record = bn_fold(
        transposed([helper.make_node("Neg", ["m"], ["q"])]), A3, [("z", T), ("q", T)]
    )
    reason = rule_reason(LinearTransposedBatchNorm, model)
    assert reason == "a value between the linear layer and the BatchNorm has another reader"
    assert (
        left(record) == "no linear layer writes it alone and tt is read by Relu, which is not a linear layer"
    )
    assert "BatchNormalization" in models.ops(out)


# --- batchnorm-linear ------------------------------------------------------------------------


def reader(extra=()):
    return [
        helper.make_node("Relu", ["a"], ["x"]),
        bn(),
        helper.make_node("MatMul", ["y", "w2"], ["z"]),
        *extra,
    ]


def test_batchnorm_linear_folds_into_its_reader():
    _, out, record = bn_fold(reader(), [("a", N)], [("z", ["batch", 6])])
    folded(record, "batchnorm-linear", "MatMul")
    assert "BatchNormalization" not in models.ops(out)


def test_batchnorm_linear_before_relu_says_why():
    nodes = [helper.make_node("Relu", ["a"], ["x"]), bn(), helper.make_node("Relu", ["y"], ["z"])]
    model, _, record = bn_fold(nodes, [("a", N)], [("z", N)])
    reason = "no linear layer writes it alone and y is read by Relu, which is not a linear layer"
    assert rule_reason(BatchNormLinear, model) == reason and left(record) == reason


def test_batchnorm_linear_with_a_non_linear_second_reader_is_refused():
    model, _, record = bn_fold(
        reader([helper.make_node("Neg", ["y"], ["q"])]), [("a", N)], [("z", ["batch", 6]), ("q", N)]
    )
    assert left(record) == "no linear layer writes it alone and y is read by Neg, which is not a linear layer"


# --- fold-norm-affine (rule FoldAffine, counted as fold-<norm op>) ---------------------------


def affine_fold(nodes, outputs, gamma="g"):
    consts = {
        "g": 1 + 0.2 * RNG.standard_normal(C),
        "ones": np.ones(C),
        "b": 0.1 * RNG.standard_normal(C),
        **CONSTS,
    }
    norm = helper.make_node("LayerNormalization", ["t_in", gamma, "b"], ["n"], axis=-1)
    model = models.graph_model([norm, *nodes], [("t_in", T)], outputs, consts, opset=20)
    _, records = models.optimize(model, ["fold-norm-affine"], cleanup=False)
    return records["fold-norm-affine"]


def test_fold_affine_into_a_matmul_reader():
    record = affine_fold([helper.make_node("MatMul", ["n", "w2"], ["z"])], [("z", ["batch", "seq", 6])])
    assert record["status"] == "applied" and record["rule_counts"] == {"fold-LayerNormalization": 1}
    assert record["max_diff"] <= 1e-4
    [site] = models.fused(record)
    assert (site["rule"], site["op"]) == ("fold-LayerNormalization", "LayerNormalization")


def test_fold_affine_read_by_gelu_says_why():
    record = affine_fold([helper.make_node("Gelu", ["n"], ["z"])], [("z", T)])
    [site] = models.unfused(record)
    assert (site["rule"], site["reason"]) == (
        "fold-norm-affine",
        "n is read by Gelu, which is not a linear layer",
    )


def test_fold_affine_with_a_shape_reader_beside_the_linear_one_still_folds():
    nodes = [helper.make_node("MatMul", ["n", "w2"], ["z"]), helper.make_node("Shape", ["n"], ["n_shape"])]
    record = affine_fold(nodes, [("z", ["batch", "seq", 6])])
    assert record["status"] == "applied" and record["max_diff"] <= 1e-4


def test_fold_affine_with_a_residual_reader_is_refused():
    nodes = [helper.make_node("MatMul", ["n", "w2"], ["z"]), helper.make_node("Add", ["n", "t_in"], ["r"])]
    record = affine_fold(nodes, [("z", ["batch", "seq", 6]), ("r", T)])
    assert models.unfused(record)[0]["reason"] == "n is read by Add, which is not a linear layer"
