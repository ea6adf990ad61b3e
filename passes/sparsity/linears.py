"""Find the linear layers of a graph: MatMul(X, W) with a constant 2-D weight, and plain Gemm.

Every sparsity pass works on these. A weight is read and written as ``[K, N]`` (input rows by
output columns) whatever the op stores, so block shapes mean the same thing everywhere
(DESIGN.md: ``1x32`` is one input row by 32 output columns). Roles keep pruning away from
what it must not touch unless asked: a weight that is also an embedding table (tied), and the
final projection (a linear whose output reaches a graph output through single-input ops only,
as an LM head or a classifier does; a residual Add or another linear on the way means it is an
inner layer).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx_ir as ir

INNER, FINAL, EMBEDDING = "inner", "final projection", "tied embedding"
# ops a final projection's output may pass through on its way out (one dynamic input each)
_OUTPUT_PATH_OPS = {"Add", "Sub", "Mul", "Div", "Cast", "Reshape", "Squeeze", "Unsqueeze", "Flatten"}
_OUTPUT_PATH_OPS |= {"Softmax", "LogSoftmax", "Sigmoid", "Tanh", "Identity", "Transpose"}


@dataclasses.dataclass
class Linear:
    """One linear layer: the node, its weight value and how the weight is laid out."""

    node: ir.Node
    weight: ir.Value
    transposed: bool  # Gemm with transB=1 stores W as [N, K]
    role: str = INNER

    @property
    def name(self) -> str:
        return self.weight.name or self.node.name or "?"

    @property
    def is_gemm(self) -> bool:
        return self.node.op_type == "Gemm"

    def matrix(self) -> np.ndarray:
        """The weight as [K, N] float array (a view of the stored tensor when possible)."""
        array = self.weight.const_value.numpy()
        return array.T if self.transposed else array

    def set_matrix(self, matrix: np.ndarray) -> None:
        """Store a new [K, N] weight in place of the old one (same dtype and layout)."""
        array = np.ascontiguousarray(matrix.T if self.transposed else matrix)
        dtype = self.weight.const_value.numpy().dtype
        self.weight.const_value = ir.tensor(array.astype(dtype), name=self.weight.name)

    @property
    def shape(self) -> tuple[int, int]:
        k, n = (int(d) for d in self.weight.const_value.shape)
        return (n, k) if self.transposed else (k, n)


def find_linears(graph: ir.Graph) -> list[Linear]:
    """Every MatMul with a constant float 2-D right operand, and Gemm(alpha=1, transA=0) likewise."""
    found = []
    for node in graph:
        linear = _as_linear(node)
        if linear is not None:
            found.append(linear)
    outputs = {id(v) for v in graph.outputs}
    for linear in found:
        linear.role = _role(linear, outputs)
    return found


def _as_linear(node: ir.Node) -> Linear | None:
    if node.domain not in ("", "ai.onnx") or len(node.inputs) < 2:
        return None
    weight = node.inputs[1]
    if weight is None or weight.const_value is None or not weight.is_initializer():
        return None
    if len(weight.const_value.shape) != 2 or weight.const_value.dtype not in _FLOATS:
        return None
    if node.op_type == "MatMul":
        return Linear(node, weight, transposed=False)
    if node.op_type == "Gemm":
        attrs = {name: attr.value for name, attr in node.attributes.items()}
        if attrs.get("transA", 0) or attrs.get("alpha", 1.0) != 1.0 or attrs.get("beta", 1.0) != 1.0:
            return None
        return Linear(node, weight, transposed=bool(attrs.get("transB", 0)))
    return None


_FLOATS = {ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.BFLOAT16, ir.DataType.DOUBLE}


def _role(linear: Linear, graph_outputs: set[int]) -> str:
    if any(use.node.op_type == "Gather" and use.idx == 0 for use in linear.weight.uses()):
        return EMBEDDING
    value = linear.node.outputs[0]
    for _ in range(16):
        if id(value) in graph_outputs:
            return FINAL
        uses = list(value.uses())
        if len(uses) != 1:
            return INNER
        node = uses[0].node
        dynamic = [v for v in node.inputs if v is not None and v.const_value is None]
        if node.op_type not in _OUTPUT_PATH_OPS or len(dynamic) != 1 or len(node.outputs) != 1:
            return INNER
        value = node.outputs[0]
    return INNER


def consumer_count(value: ir.Value) -> int:
    """How many node inputs and graph outputs read this value."""
    return len(list(value.uses())) + int(value.is_graph_output())
