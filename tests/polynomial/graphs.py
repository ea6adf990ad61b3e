"""Tiny hand-built ONNX graphs, one non-linearity each, and a runner for the HE passes."""

from __future__ import annotations

import zlib

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from txcompile.pass_manager import PassManager
from txcompile.passes.base import PassContext
from txcompile.passes.polynomial.contract import CheckContract
from txcompile.passes.polynomial.rewrite import PolynomialForm

HIDDEN = 8


def weight(name: str, shape, scale: float = 0.5) -> onnx.TensorProto:
    """Deterministic per name, whatever order tests run in."""
    rng = np.random.default_rng(zlib.crc32(name.encode()))
    return numpy_helper.from_array((rng.standard_normal(shape) * scale).astype(np.float32), name)


def model(nodes, inputs, outputs, initializers=()) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "g", inputs, outputs, list(initializers))
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)])
    proto.ir_version = 10
    return proto


def x_input(name: str = "x", shape=(2, 4, HIDDEN)) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, list(shape))


def out(name: str, shape=(2, 4, HIDDEN)) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, list(shape))


def linear(prefix: str, source: str, target: str):
    """MatMul + bias: the producer the pre-scaling folds into."""
    nodes = [
        helper.make_node("MatMul", [source, f"{prefix}.w"], [f"{prefix}.mm"], name=f"{prefix}_mm"),
        helper.make_node("Add", [f"{prefix}.mm", f"{prefix}.b"], [target], name=f"{prefix}_add"),
    ]
    inits = [weight(f"{prefix}.w", (HIDDEN, HIDDEN)), weight(f"{prefix}.b", (HIDDEN,), 0.1)]
    return nodes, inits


def feeds_for(proto: onnx.ModelProto, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    feeds = {}
    for value in proto.graph.input:
        shape = [d.dim_value for d in value.type.tensor_type.shape.dim]
        if value.type.tensor_type.elem_type == TensorProto.FLOAT:
            feeds[value.name] = rng.standard_normal(shape).astype(np.float32)
        else:
            mask = np.ones(shape, dtype=np.int64)
            mask[1:, -1] = 0
            feeds[value.name] = mask
    return feeds


def polynomial(proto: onnx.ModelProto, **options):
    """Run he-polynomial then he-contract; returns (pipeline result, he-polynomial record)."""
    feeds = feeds_for(proto)
    context = PassContext("he", "cpu", feeds, options)
    result = PassManager([PolynomialForm(context), CheckContract(context)]).run(proto, feeds)
    return result, result.records[0]


def op_types(proto: onnx.ModelProto) -> set[str]:
    return {n.op_type for n in proto.graph.node}
