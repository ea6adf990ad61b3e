"""The one graph builder every rewrite uses: collect new nodes and constants, insert them once.

A rewrite builds its replacement off to the side and commits it in one step, so a rule that
gives up half way leaves the graph as it was. Constants get names unique in the graph and
deterministic across runs (no global counters), so the same model compiles to the same bytes.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import onnx_ir as ir


def side_by_side(parts: Sequence[np.ndarray | ir.TensorProtocol]) -> ir.LazyTensor:
    """[P₁ | P₂ | …] of 2-D weights in float32, computed only when the model is written out
    (:meth:`GraphBuilder.const` keeps it so): packed projections of every layer are then never
    in memory at once, and a rule's check needs only the shape."""
    rows, columns = parts[0].shape[0], sum(p.shape[1] for p in parts)

    def concatenate() -> ir.Tensor:
        arrays = [p if isinstance(p, np.ndarray) else p.numpy() for p in parts]
        return ir.Tensor(np.concatenate([a.astype(np.float32, copy=False) for a in arrays], axis=1))

    return ir.LazyTensor(concatenate, dtype=ir.DataType.FLOAT, shape=ir.Shape([rows, columns]))


AXES_INPUT_SINCE = {"Squeeze": 13, "Unsqueeze": 13, "ReduceSum": 13}  # other Reduce*: 18


class GraphBuilder:
    """New nodes and constants for one site; ``commit`` inserts them before ``anchor``."""

    def __init__(self, graph: ir.Graph, prefix: str, anchor: ir.Node | None = None) -> None:
        self.graph, self.prefix, self.anchor = graph, prefix, anchor
        self.nodes: list[ir.Node] = []
        self._count = 0

    def op(self, op_type: str, *inputs: ir.Value | None, domain: str = "", **attributes) -> ir.Value:
        """One node with one output: ``b.op("Mul", x, y)``, attributes as keywords."""
        return self.ops(op_type, list(inputs), attributes, domain=domain)[0]

    def ops(
        self, op_type: str, inputs, attributes=None, domain: str = "", outputs: int = 1
    ) -> list[ir.Value]:
        """One node, all its outputs (for ops such as GroupQueryAttention that have several)."""
        self._count += 1
        node = ir.node(
            op_type,
            list(inputs),
            attributes or None,
            domain=domain,
            num_outputs=outputs,
            name=f"{self.prefix}/{op_type}_{self._count}",
        )
        self.nodes.append(node)
        return list(node.outputs)

    def axes_op(self, op_type: str, x: ir.Value, axes: Sequence[int], opset: int, **attributes) -> ir.Value:
        """``op_type`` over ``axes``, written as ``opset`` takes them: an input from the opset
        that moved them there (13 for Squeeze, Unsqueeze and ReduceSum, 18 for the other
        reductions), an attribute before."""
        if opset >= AXES_INPUT_SINCE.get(op_type, 18):
            return self.op(op_type, x, self.const(np.array(axes, np.int64)), **attributes)
        return self.op(op_type, x, axes=list(axes), **attributes)

    def const(self, value, dtype=None) -> ir.Value:
        """An initializer; an array keeps its dtype, a Python number or list becomes float32
        unless ``dtype`` says otherwise. An ``ir.LazyTensor`` is kept as it is: a large weight
        built from others is then computed only when the model is written out."""
        name = self._free_name()
        if isinstance(value, ir.LazyTensor):
            value.name = name
            constant = ir.Value(
                name=name, const_value=value, shape=value.shape, type=ir.TensorType(value.dtype)
            )
            self.graph.register_initializer(constant)
            return constant
        if dtype is not None or not isinstance(value, np.ndarray):
            value = np.asarray(value, dtype=dtype or np.float32)
        constant = ir.Value(name=name, const_value=ir.tensor(value, name=name))
        constant.shape = ir.Shape(value.shape)
        constant.type = ir.TensorType(ir.DataType.from_numpy(value.dtype))
        self.graph.register_initializer(constant)
        return constant

    def outside_uses(self, value: ir.Value) -> int:
        """Uses of ``value`` by nodes already in the graph (not the ones this builder made)."""
        mine = set(map(id, self.nodes))
        return sum(1 for use in value.uses() if id(use.node) not in mine)

    def commit(self, anchor: ir.Node | None = None) -> list[ir.Node]:
        """Insert the collected nodes before ``anchor`` (default: the builder's; none: append)."""
        anchor = anchor or self.anchor
        if self.nodes:
            if anchor is None:
                self.graph.extend(self.nodes)
            else:
                self.graph.insert_before(anchor, self.nodes)
        nodes, self.nodes = self.nodes, []
        return nodes

    def _free_name(self) -> str:
        while True:
            self._count += 1
            name = f"{self.prefix}/c{self._count}"
            if name not in self.graph.initializers:
                return name
