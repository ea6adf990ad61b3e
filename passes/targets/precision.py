"""Precision: run the graph in fp16 or bf16 where the target has kernels and numerics allow.

GPUs are fast in half precision; the CUDA EP has fp16 kernels for nearly every transformer op.
Each node is decided in graph order against the target's kernel table (txcompile.graph.kernels), so
an op with no half-precision kernel there stays fp32 instead of falling back or failing:

- ops whose numerics need fp32 (powers, reductions, square roots, exp/log, cos/sin of RoPE
  angles) stay fp32, and so does every node fed only by such fp32 work (the RMSNorm variance
  chain, the rotary-angle MatMul, the attention-mask arithmetic), until it meets a
  half-precision value;
- inputs a schema fixes at ``tensor(float)`` (Resize scales, ...) stay fp32;
- float weights are stored once per precision they are used in, clipped to fp16's range;
- Casts are inserted where the two regions meet, once per value; graph inputs and outputs
  stay fp32 unless ``--low-precision-io``.

Approximate: the pass manager reports the drift against the fp32 graph.
"""

from __future__ import annotations

import collections
import dataclasses
import itertools

import ml_dtypes
import numpy as np
import onnx_ir as ir

from txcompile.graph import kernels
from txcompile.graph.errors import TxError
from txcompile.graph.nodes import op_key
from txcompile.passes.base import TxPass
from txcompile.passes.targets.kernel_check import _version, value_dtypes

LOW = {"fp16": ir.DataType.FLOAT16, "bf16": ir.DataType.BFLOAT16}
CHOICES = ("fp32", "fp16", "bf16", "int8", "int4")
DEFAULT_PRECISION = {"cpu": "fp32", "gpu": "fp16"}

# Kept fp32 for numerics: large intermediate values, or results that amplify input rounding.
KEEP_FP32 = {
    "Pow": "x² overflows fp16 and variance needs fp32",
    "ReduceMean": "long reductions lose fp16 precision",
    "ReduceSum": "long reductions lose fp16 precision",
    "ReduceSumSquare": "long reductions lose fp16 precision",
    "ReduceL2": "long reductions lose fp16 precision",
    "ReduceProd": "products overflow fp16",
    "ReduceLogSumExp": "exp overflows fp16",
    "Sqrt": "rsqrt of a small variance needs fp32",
    "Reciprocal": "rsqrt of a small variance needs fp32",
    "Exp": "exp overflows fp16",
    "Log": "log of small values needs fp32",
    "CumSum": "running sums lose fp16 precision",
    "Cos": "rotary angles grow with the position",
    "Sin": "rotary angles grow with the position",
}
# Ops that make their output type from an attribute, not from their inputs.
TYPED_BY_ATTRIBUTE = {"Cast", "CastLike", "Constant", "ConstantOfShape", "EyeLike", "Range"}
TYPED_BY_ATTRIBUTE |= {"RandomNormal", "RandomNormalLike", "RandomUniform", "RandomUniformLike"}


def requested_precision(asked: str | None, target: str) -> str:
    """The precision the user asked for, or the target's default; bad combinations exit 2."""
    precision = asked or DEFAULT_PRECISION.get(target, "fp32")
    if precision not in CHOICES:
        raise TxError(f"--precision {precision}: choose one of {', '.join(CHOICES)}")
    if precision == "int8" and target != "cpu":
        raise TxError("--precision int8 is for --target cpu (dynamic int8 MatMul kernels are CPU-only)")
    return precision


@dataclasses.dataclass(frozen=True)
class PrecisionOptions:
    precision: str | None = None  # None: the target's default
    low_precision_io: bool = False  # graph inputs/outputs in fp16/bf16 too


class Precision(TxPass):
    name = "precision"
    summary = "fp16/bf16 where the target has kernels and numerics allow; fp32 graph inputs/outputs"
    exact = False
    Options = PrecisionOptions

    def __init__(self, context=None) -> None:
        super().__init__(context)
        self.precision = requested_precision(self.options.precision, self.context.target)

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        if self.precision not in LOW:
            self.details = {"precision": self.precision, "note": "nothing to do at this precision"}
            return ir.passes.PassResult(model, False)
        converter = _Converter(
            model,
            LOW[self.precision],
            kernels.table_for(self.context.device),
            keep_io=not self.options.low_precision_io,
        )
        converter.run()
        self.tag(converter.casts, "insert-cast")
        self.rule_counts.update(converter.counts)
        self.details = {
            "precision": self.precision,
            "kernels": converter.table.provider,
            "low_ops": dict(sorted(converter.low_ops.items())),
            "kept_fp32": {op: dict(reasons) for op, reasons in sorted(converter.kept.items())},
            "casts": len(converter.casts),
            "io": "fp32" if converter.keep_io else self.precision,
        }
        return ir.passes.PassResult(model, bool(converter.low_ops))


class _Converter:
    """Decide each node's precision in graph order, then rewrite types, weights and casts."""

    def __init__(self, model: ir.Model, low: ir.DataType, table: kernels.KernelTable, keep_io: bool):
        self.model, self.graph, self.low, self.table, self.keep_io = model, model.graph, low, table, keep_io
        self.low_name = low.name.lower()
        self.dtypes = value_dtypes(model)
        self.state: dict[ir.Value, str] = {}  # "low" or "kept"; absent = neutral (inputs, weights)
        self.counts: collections.Counter[str] = collections.Counter()
        self.low_ops: collections.Counter[str] = collections.Counter()
        self.kept: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)
        self.casts: list[ir.Node] = []
        self._low_weights: dict[ir.Value, ir.Value] = {}
        self._casts: dict[tuple[ir.Value, ir.DataType], ir.Value] = {}

    def is_float(self, value: ir.Value | None) -> bool:
        return value is not None and self.dtypes.get(value) == "float"

    def run(self) -> None:
        if not self.keep_io:
            for value in self.graph.inputs:
                if self.is_float(value):
                    value.dtype = self.low
                    self.state[value] = "low"
        plans = {}
        for node in list(self.graph):
            plan, reason = self.decide(node)
            if plan is None:
                if reason:
                    self.kept[op_key(node)][reason] += 1
                for value in node.outputs:
                    if self.is_float(value):
                        self.state[value] = "kept"
                        value.dtype = ir.DataType.FLOAT  # make the inferred type explicit
                continue
            plans[node] = plan
            self.low_ops[op_key(node)] += 1
            for index in plan[1]:
                self.state[node.outputs[index]] = "low"
        for node, (inputs, outputs) in plans.items():
            self.lower(node, inputs, outputs)
        for node in list(self.graph):
            if node not in plans and node not in self.casts:
                self.raise_inputs(node)
        self.fix_outputs()
        self.drop_unused_weights()
        self.counts[f"to-{self.low_name}"] = sum(self.low_ops.values())

    # --- deciding ---------------------------------------------------------------------------

    def decide(self, node: ir.Node) -> tuple[tuple[list[int], list[int]] | None, str | None]:
        """((input positions, output positions) to lower, None) or (None, why it stays fp32)."""
        floats_in = [i for i, v in enumerate(node.inputs) if self.is_float(v)]
        floats_out = [i for i, v in enumerate(node.outputs) if self.is_float(v)]
        if not floats_in and not floats_out:
            return None, None
        if node.op_type in TYPED_BY_ATTRIBUTE:
            return None, None
        if node.op_type in KEEP_FP32:
            return None, KEEP_FP32[node.op_type]
        if any(
            attr.type in (ir.AttributeType.GRAPH, ir.AttributeType.GRAPHS)
            for attr in node.attributes.values()
        ):
            return None, "has subgraphs"
        if any(use.node.graph is not self.graph for v in node.outputs for use in v.uses()):
            return None, "output used inside a subgraph"
        sources = {self.state.get(node.inputs[i]) for i in floats_in}
        if "low" not in sources and "kept" in sources:
            return None, "fed only by fp32 work"
        version = _version(self.model.opset_imports, node.domain)
        schema = kernels.schema_for(node.domain, node.op_type, version)
        if schema is None:
            return None, "unknown op"
        in_formal = kernels.formal_types(schema, len(node.inputs))
        out_formal = kernels.formal_types(schema, len(node.outputs), outputs=True)
        constraints = {c.type_param_str for c in schema.type_constraints}
        current = kernels.bind(
            schema,
            [self.dtypes.get(v) if v is not None else None for v in node.inputs],
            [self.dtypes.get(v) for v in node.outputs],
        )
        movable = sorted(p for p, t in current.items() if t == "float" and p in constraints)
        if not movable:
            return None, "float inputs are fixed fp32 by the schema"
        for size in range(len(movable), 0, -1):
            for chosen in itertools.combinations(movable, size):
                binding = {**current, **{p: self.low_name for p in chosen}}
                if self.table.has(node.domain, node.op_type, version, binding):
                    inputs = [i for i in floats_in if in_formal[i] in chosen]
                    outputs = [i for i in floats_out if out_formal[i] in chosen]
                    if inputs or outputs:
                        return (inputs, outputs), None
        short = kernels.PROVIDERS_SHORT.get(self.table.provider, self.table.provider)
        return None, f"no {self.low_name} kernel on {short}"

    # --- rewriting --------------------------------------------------------------------------

    def lower(self, node: ir.Node, inputs: list[int], outputs: list[int]) -> None:
        for index in inputs:
            value = node.inputs[index]
            if self.state.get(value) == "low":
                continue
            weight = _constant_array(value)
            if weight is not None:
                node.replace_input_with(index, self.low_weight(value, weight))
            else:
                node.replace_input_with(index, self.cast(value, self.low))
        for index in outputs:
            node.outputs[index].dtype = self.low

    def raise_inputs(self, node: ir.Node) -> None:
        """An fp32 node reading a value that is now half precision gets it cast back."""
        for index, value in enumerate(node.inputs):
            if value is not None and self.state.get(value) == "low" and value.dtype == self.low:
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
            self.state[weight] = "low"
            self._low_weights[value] = weight
            self.counts["weights"] += 1
        return self._low_weights[value]

    def fix_outputs(self) -> None:
        """Graph outputs keep their names, and stay fp32 unless asked otherwise."""
        if not self.keep_io:
            return
        for position, value in enumerate(list(self.graph.outputs)):
            if value.dtype != self.low or self.state.get(value) != "low":
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


def _constant_array(value: ir.Value) -> np.ndarray | None:
    """The float array behind an initializer or a Constant node's output, else None."""
    if value.const_value is not None and value.is_initializer():
        return value.const_value.numpy()
    producer = value.producer()
    if producer is not None and producer.op_type == "Constant" and "value" in producer.attributes:
        return producer.attributes["value"].value.numpy()
    return None
