"""Shared fixtures: small ONNX graphs built by hand, so core tests need no exporter."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper


def mlp_model(identity: bool = True) -> onnx.ModelProto:
    """x[batch, 8] → MatMul → Add(bias + folded constant) → Identity → Reshape → Reshape → Relu."""
    rng = np.random.default_rng(0)
    weight = numpy_helper.from_array(rng.standard_normal((8, 8)).astype(np.float32), "weight")
    bias_a = numpy_helper.from_array(rng.standard_normal(8).astype(np.float32), "bias_a")
    bias_b = numpy_helper.from_array(rng.standard_normal(8).astype(np.float32), "bias_b")
    flat = numpy_helper.from_array(np.array([-1], dtype=np.int64), "flat")
    back = numpy_helper.from_array(np.array([-1, 8], dtype=np.int64), "back")
    nodes = [
        helper.make_node("Add", ["bias_a", "bias_b"], ["bias"], name="fold_me"),
        helper.make_node("MatMul", ["x", "weight"], ["mm"], name="mm"),
        helper.make_node("Add", ["mm", "bias"], ["biased"], name="add"),
        helper.make_node("Identity" if identity else "Neg", ["biased"], ["same"], name="identity"),
        helper.make_node("Reshape", ["same", "flat"], ["flat_out"], name="reshape1"),
        helper.make_node("Reshape", ["flat_out", "back"], ["back_out"], name="reshape2"),
        helper.make_node("Relu", ["back_out"], ["y"], name="relu"),
    ]
    graph = helper.make_graph(
        nodes,
        "mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 8])],
        [weight, bias_a, bias_b, flat, back],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9
    onnx.checker.check_model(model)
    return model


@pytest.fixture
def mlp() -> onnx.ModelProto:
    return mlp_model()


@pytest.fixture
def mlp_file(tmp_path, mlp) -> str:
    path = tmp_path / "mlp.onnx"
    onnx.save(mlp, path)
    return str(path)
