"""Small hand-built graphs for the target tests: each isolates one decision."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

FLOAT = TensorProto.FLOAT


def make(nodes, inputs, outputs, initializers=(), opset=18, ms=False) -> onnx.ModelProto:
    imports = [helper.make_opsetid("", opset)] + ([helper.make_opsetid("com.microsoft", 1)] if ms else [])
    graph = helper.make_graph(nodes, "g", inputs, outputs, list(initializers))
    model = helper.make_model(graph, opset_imports=imports)
    model.ir_version = 9
    return model


def tensor(name, shape, dtype=FLOAT):
    return helper.make_tensor_value_info(name, dtype, shape)


def weight(name, shape, seed=0, scale=0.2) -> onnx.TensorProto:
    rng = np.random.default_rng(seed)
    return numpy_helper.from_array((rng.standard_normal(shape) * scale).astype(np.float32), name)


def linear_block(hidden: int = 16) -> onnx.ModelProto:
    """x → MatMul(W1) → Add(b) → Relu → MatMul(W2) → LayerNormalization → y."""
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["h"], name="mm1"),
        helper.make_node("Add", ["h", "b1"], ["hb"], name="bias"),
        helper.make_node("Relu", ["hb"], ["r"], name="relu"),
        helper.make_node("MatMul", ["r", "w2"], ["o"], name="mm2"),
        helper.make_node("LayerNormalization", ["o", "gamma", "beta"], ["y"], name="ln", axis=-1),
    ]
    inits = [
        weight("w1", (hidden, hidden), 1),
        weight("b1", (hidden,), 2),
        weight("w2", (hidden, hidden), 3),
        numpy_helper.from_array(np.ones(hidden, np.float32), "gamma"),
        numpy_helper.from_array(np.zeros(hidden, np.float32), "beta"),
    ]
    return make(nodes, [tensor("x", ["batch", hidden])], [tensor("y", ["batch", hidden])], inits)


def rms_norm(hidden: int = 16) -> onnx.ModelProto:
    """LLaMA-style RMSNorm after a MatMul: Pow → ReduceMean → Add(eps) → Sqrt → Div → Mul."""
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["h"], name="mm"),
        helper.make_node("Pow", ["h", "two"], ["sq"], name="pow"),
        helper.make_node("ReduceMean", ["sq", "axes"], ["var"], name="mean", keepdims=1),
        helper.make_node("Add", ["var", "eps"], ["var_eps"], name="add_eps"),
        helper.make_node("Sqrt", ["var_eps"], ["std"], name="sqrt"),
        helper.make_node("Div", ["one", "std"], ["rstd"], name="rsqrt"),
        helper.make_node("Mul", ["h", "rstd"], ["normed"], name="scale"),
        helper.make_node("Mul", ["normed", "gain"], ["y"], name="gain_mul"),
    ]
    inits = [
        weight("w", (hidden, hidden)),
        numpy_helper.from_array(np.array(2.0, np.float32), "two"),
        numpy_helper.from_array(np.array([-1], np.int64), "axes"),
        numpy_helper.from_array(np.array(1e-6, np.float32), "eps"),
        numpy_helper.from_array(np.array(1.0, np.float32), "one"),
        numpy_helper.from_array(np.linspace(0.5, 1.5, hidden).astype(np.float32), "gain"),
    ]
    return make(nodes, [tensor("x", ["batch", hidden])], [tensor("y", ["batch", hidden])], inits)


def shared_intermediate(hidden: int = 16) -> onnx.ModelProto:
    """h = MatMul(x, W) feeds both a Relu (fp16-able) and an Exp (kept fp32) and is an output."""
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["h"], name="mm"),
        helper.make_node("Relu", ["h"], ["r"], name="relu"),
        helper.make_node("Exp", ["h"], ["e"], name="exp"),
        helper.make_node("Add", ["r", "e"], ["y"], name="add"),
    ]
    return make(
        nodes,
        [tensor("x", ["batch", hidden])],
        [tensor("y", ["batch", hidden]), tensor("h", ["batch", hidden])],
        [weight("w", (hidden, hidden), scale=0.1)],
    )


def contrib(op: str, inputs: list[str], dtype=FLOAT, **attrs) -> onnx.ModelProto:
    """One com.microsoft op whose inputs are all graph inputs of ``dtype`` (output type unknown)."""
    node = helper.make_node(op, inputs, ["y"], domain="com.microsoft", name=op.lower(), **attrs)
    return make(
        [node],
        [tensor(name, ["a", "b"], dtype) for name in inputs],
        [helper.make_value_info("y", onnx.TypeProto())],
        ms=True,
    )
