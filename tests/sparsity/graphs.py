"""Small hand-built graphs with known sparsity, so each rule is tested on exactly its pattern."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

RNG = np.random.default_rng(0)


def block_sparse(k: int, n: int, rows: int, cols: int, sparsity: float, seed: int = 0) -> np.ndarray:
    """A [K, N] weight whose zeros come in whole ``rows x cols`` blocks, balanced per column group."""
    rng = np.random.default_rng(seed)
    weight = (rng.standard_normal((k, n)) / np.sqrt(k)).astype(np.float32)
    keep_per_group = max(1, round((1 - sparsity) * k / rows))
    mask = np.zeros((k // rows, n // cols), dtype=bool)
    for g in range(n // cols):
        mask[rng.choice(k // rows, keep_per_group, replace=False), g] = True
    return (weight * np.repeat(np.repeat(mask, rows, axis=0), cols, axis=1)).astype(np.float32)


def _model(nodes, inputs, outputs, initializers, opset: int = 20) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "g", inputs, outputs, initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 9
    onnx.checker.check_model(model)
    return model


def _init(array: np.ndarray, name: str):
    return numpy_helper.from_array(np.asarray(array), name)


def linear(weight: np.ndarray, bias: np.ndarray | None = None, rank: int = 3, relu: bool = True):
    """x [batch, seq, K] -> MatMul(W) (+ bias) (-> Relu) -> y; Relu keeps the linear an inner layer."""
    k, n = weight.shape
    shape_in = ["batch", "seq", k][-rank:]
    nodes = [helper.make_node("MatMul", ["x", "w"], ["mm"])]
    inits = [_init(weight, "w")]
    last = "mm"
    if bias is not None:
        nodes.append(helper.make_node("Add", [last, "b"], ["biased"]))
        inits.append(_init(bias, "b"))
        last = "biased"
    if relu:
        nodes.append(helper.make_node("Relu", [last], ["y"]))
    else:
        nodes.append(helper.make_node("Identity", [last], ["y"]))
    return _model(
        nodes,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape_in)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [*shape_in[:-1], n])],
        inits,
    )


def gemm(weight_nk: np.ndarray, bias: np.ndarray):
    """x [batch, K] -> Gemm(transB=1) -> Relu: the TorchScript form of a 2-D linear."""
    n, k = weight_nk.shape
    return _model(
        [
            helper.make_node("Gemm", ["x", "w", "b"], ["mm"], transB=1),
            helper.make_node("Relu", ["mm"], ["y"]),
        ],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", n])],
        [_init(weight_nk, "w"), _init(bias, "b")],
    )


def ffn(
    up: np.ndarray, down: np.ndarray, bias: np.ndarray, expose_hidden: bool = False, between: str = "Gelu"
):
    """x -> MatMul(up) + bias -> Gelu -> MatMul(down) -> + x (residual); optionally the Gelu output
    is also a graph output (another consumer), or ``between`` is a non-elementwise op."""
    hidden, inner = up.shape
    nodes = [
        helper.make_node("MatMul", ["x", "up"], ["h"]),
        helper.make_node("Add", ["h", "bias"], ["hb"]),
    ]
    if between == "Gelu":
        nodes.append(helper.make_node("Gelu", ["hb"], ["act"]))
    else:
        nodes.append(helper.make_node(between, ["hb"], ["act"], axis=-1))
    nodes += [
        helper.make_node("MatMul", ["act", "down"], ["d"]),
        helper.make_node("Add", ["d", "x"], ["y"]),
    ]
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", "seq", hidden])]
    if expose_hidden:
        outputs.append(helper.make_tensor_value_info("act", TensorProto.FLOAT, ["batch", "seq", inner]))
    return _model(
        nodes,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "seq", hidden])],
        outputs,
        [_init(up, "up"), _init(down, "down"), _init(bias, "bias")],
    )


def swiglu(gate: np.ndarray, up: np.ndarray, down: np.ndarray):
    """LLaMA's MLP: down(silu(gate(x)) * up(x)), SiLU written as x * Sigmoid(x)."""
    hidden, _ = gate.shape
    return _model(
        [
            helper.make_node("MatMul", ["x", "gate"], ["g"]),
            helper.make_node("Sigmoid", ["g"], ["sg"]),
            helper.make_node("Mul", ["g", "sg"], ["silu"]),
            helper.make_node("MatMul", ["x", "up"], ["u"]),
            helper.make_node("Mul", ["silu", "u"], ["gu"]),
            helper.make_node("MatMul", ["gu", "down"], ["d"]),
            helper.make_node("Add", ["d", "x"], ["y"]),
        ],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "seq", hidden])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", "seq", hidden])],
        [_init(gate, "gate"), _init(up, "up"), _init(down, "down")],
    )


def feeds(k: int, batch: int = 2, seq: int = 8, seed: int = 1) -> dict[str, np.ndarray]:
    return {"x": np.random.default_rng(seed).standard_normal((batch, seq, k)).astype(np.float32)}


def apply(pass_classes, model: onnx.ModelProto, feeds: dict, **options):
    """Run passes through the verifying pass manager; returns (records, final model)."""
    from txcompile.pass_manager import PassManager
    from txcompile.passes.base import PassContext

    context = PassContext(feeds=feeds, flags=options)
    result = PassManager([cls(context) for cls in pass_classes]).run(model, feeds)
    return result.records, result.model


def run(model: onnx.ModelProto, feeds: dict) -> list[np.ndarray]:
    from txcompile.graph import ort as rt

    return list(rt.run(rt.create_session(model), feeds).values())


def ops(model: onnx.ModelProto) -> dict[str, int]:
    counts: dict[str, int] = {}
    for node in model.graph.node:
        counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return counts


def initializer(model: onnx.ModelProto, name: str) -> np.ndarray:
    return next(numpy_helper.to_array(t) for t in model.graph.initializer if t.name == name)
