"""fold-batchnorm: inference BatchNorm folds into the Conv / linear layer next to it."""

from __future__ import annotations

import numpy as np
import pytest
from onnx import helper

from tests.norms import models
from txcompile.exporters import export_onnx, load_model_spec

BN_MODEL = "tests/norms/bn_model.py:factory"
C = 4
RNG = np.random.default_rng(3)
STATS = {
    "s": 1 + 0.2 * RNG.standard_normal(C),
    "t": 0.2 * RNG.standard_normal(C),
    "mean": 0.5 * RNG.standard_normal(C),
    "var": 0.5 + RNG.random(C),
    "k": RNG.standard_normal((C, 3, 3, 3)),
    "kb": RNG.standard_normal(C),
    "w": RNG.standard_normal((6, C)),
}


def bn(x="x", y="y"):
    return helper.make_node("BatchNormalization", [x, "s", "t", "mean", "var"], [y], epsilon=1e-5)


def fold(nodes, inputs, outputs):
    model = models.graph_model(nodes, inputs, outputs, STATS)
    out, records = models.optimize(model, ["fold-batchnorm"], cleanup=False)
    return out, records["fold-batchnorm"]


def test_conv_then_batchnorm_folds():
    nodes = [helper.make_node("Conv", ["img", "k", "kb"], ["x"], pads=[1, 1, 1, 1]), bn()]
    out, record = fold(nodes, [("img", ["batch", 3, 8, 8])], [("y", ["batch", C, 8, 8])])
    assert record["rule_counts"] == {"conv-batchnorm": 1} and record["max_diff"] <= 1e-4
    assert models.ops(out) == {"Conv": 1}


def test_linear_then_batchnorm_folds():
    nodes = [helper.make_node("Gemm", ["a", "w"], ["x"]), bn()]
    out, record = fold(nodes, [("a", ["batch", 6])], [("y", ["batch", C])])
    assert record["rule_counts"] == {"linear-batchnorm": 1} and record["max_diff"] <= 1e-4
    assert models.ops(out) == {"Gemm": 1}


def test_batchnorm_after_relu_is_left():
    nodes = [helper.make_node("Relu", ["a"], ["x"]), bn(), helper.make_node("Relu", ["y"], ["z"])]
    out, record = fold(nodes, [("a", ["batch", C])], [("z", ["batch", C])])
    assert record["status"] == "unchanged" and "BatchNormalization" in models.ops(out)
    assert "Relu" in models.unfused(record)[0]["reason"]


def test_conv_output_read_by_another_node_is_not_folded_into_the_conv():
    nodes = [
        helper.make_node("Conv", ["img", "k", "kb"], ["x"], pads=[1, 1, 1, 1]),
        bn(),
        helper.make_node("Relu", ["x"], ["r"]),
    ]
    shape = ["batch", C, 8, 8]
    out, record = fold(nodes, [("img", ["batch", 3, 8, 8])], [("y", shape), ("r", shape)])
    assert record["status"] == "unchanged" and "BatchNormalization" in models.ops(out)


@pytest.mark.parametrize("exporter", ["torchscript", pytest.param("dynamo", marks=pytest.mark.slow)])
def test_batchnorm_transformer_folds_every_batchnorm(exporter):
    model = export_onnx(load_model_spec(BN_MODEL), exporter=exporter).model
    assert "BatchNormalization" in models.ops(model)
    out, records = models.optimize(model, ["fold-batchnorm"])
    record = records["fold-batchnorm"]
    assert record["status"] == "applied" and record["max_diff"] <= 1e-4
    assert models.unfused(record) == []
    assert "BatchNormalization" not in models.ops(out)
    assert {"linear-transposed-batchnorm", "batchnorm-linear"} <= set(record["rule_counts"])
