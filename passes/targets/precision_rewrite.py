"""Rewrite a graph to the precision each node was given: types, half-precision weights, Casts.

Weights are stored once per precision they are used in (fp16 clipped to its range); a Cast is
inserted once per value where an fp32 region meets a half-precision one; graph outputs keep
their names and stay fp32 unless ``--low-precision-io``.
"""

from __future__ import annotations

import collections

import ml_dtypes
import numpy as np
import onnx_ir as ir

from txcompile.graph.constants import constant_array
from txcompile.passes.targets.precision_plan import LOW, PrecisionPlan


class LowPrecisionRewrite:
    """Applies a :class:`PrecisionPlan`; ``casts`` are the Cast nodes it inserted."""

    def __init__(self, plan: PrecisionPlan) -> None:
        self.plan, self.graph, self.low, self.low_name = plan, plan.graph, plan.low, plan.low_name
        self.state = plan.state
        self.counts: collections.Counter[str] = collections.Counter()
        self.casts: list[ir.Node] = []
        self._low_weights: dict[ir.Value, ir.Value] = {}
        self._casts: dict[tuple[ir.Value, ir.DataType], ir.Value] = {}

    def apply(self) -> None:
        plans = self.plan.plans
        for node, (inputs, outputs) in plans.items():
            self.lower(node, inputs, outputs)
        for node in list(self.graph):
            if node not in plans and node not in self.casts:
                self.raise_inputs(node)
        self.fix_outputs()
        self.drop_unused_weights()
        self.counts[f"to-{self.low_name}"] = sum(self.plan.low_ops.values())

    def lower(self, node: ir.Node, inputs: list[int], outputs: list[int]) -> None:
        for index in inputs:
            value = node.inputs[index]
            if self.state.get(value) == LOW:
                continue
            weight = _weight_array(value)
            if weight is not None:
                node.replace_input_with(index, self.low_weight(value, weight))
            else:
                node.replace_input_with(index, self.cast(value, self.low))
        for index in outputs:
            node.outputs[index].dtype = self.low

    def raise_inputs(self, node: ir.Node) -> None:
        """An fp32 node reading a value that is now half precision gets it cast back."""
        for index, value in enumerate(node.inputs):
            if value is not None and self.state.get(value) == LOW and value.dtype == self.low:
                node.replace_input_with(index, self.cast(value, ir.DataType.FLOAT))

    def cast(self, value: ir.Value, to: ir.DataType) -> ir.Value:
        key = (value, to)
        if key not in self._casts:
            suffix = "fp32" if to == ir.DataType.FLOAT else self.low_name
            out = ir.Value(name=f"{value.name}_{suffix}", type=ir.TensorType(to), shape=value.shape)
            node = ir.node("Cast", [value], {"to": to}, outputs=[out], name=f"{value.name}_cast_{suffix}")
            producer = value.producer()
            if producer is not None and producer.graph is self.graph:
                self.graph.insert_after(producer, node)
            else:
                self.graph.insert_before(self.graph[0], node)
            self.casts.append(node)
            self.counts["cast"] += 1
            self._casts[key] = out
        return self._casts[key]

    def low_weight(self, value: ir.Value, array: np.ndarray) -> ir.Value:
        if value not in self._low_weights:
            if self.low == ir.DataType.FLOAT16:
                limit = np.finfo(np.float16).max
                array = np.clip(array, -limit, limit).astype(np.float16)
                tensor = ir.tensor(array, name=f"{value.name}_{self.low_name}")
            else:
                array = array.astype(ml_dtypes.bfloat16)
                tensor = ir.tensor(array, dtype=self.low, name=f"{value.name}_{self.low_name}")
            weight = ir.Value(name=tensor.name, type=ir.TensorType(self.low), shape=ir.Shape(array.shape))
            weight.const_value = tensor
            self.graph.register_initializer(weight)
            self.state[weight] = LOW
            self._low_weights[value] = weight
            self.counts["weights"] += 1
        return self._low_weights[value]

    def fix_outputs(self) -> None:
        """Graph outputs keep their names, and stay fp32 unless asked otherwise."""
        if not self.plan.keep_io:
            return
        for position, value in enumerate(list(self.graph.outputs)):
            if value.dtype != self.low or self.state.get(value) != LOW:
                continue
            name = value.name
            value.name = f"{name}_{self.low_name}"
            out = self.cast(value, ir.DataType.FLOAT)  # shared with fp32 readers of the value
            out.name = name
            self.graph.outputs[position] = out

    def drop_unused_weights(self) -> None:
        for node in list(self.graph):
            if node.op_type == "Constant" and not any(v.uses() or v.is_graph_output() for v in node.outputs):
                self.graph.remove(node, safe=True)
        for name, value in list(self.graph.initializers.items()):
            if not value.uses() and not value.is_graph_output() and value not in self.graph.inputs:
                del self.graph.initializers[name]


def _weight_array(value: ir.Value) -> np.ndarray | None:
    """The array behind an initializer or a Constant node's ``value``, else None (a Cast then)."""
    producer = value.producer()
    constant = producer is not None and producer.op_type == "Constant" and "value" in producer.attributes
    return constant_array(value) if value.is_initializer() or constant else None
