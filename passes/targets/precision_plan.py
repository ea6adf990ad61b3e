"""Which nodes of a graph can run in half precision: decided once per node, in graph order.

A node goes fp16/bf16 when the target has a kernel for it at that dtype and its numerics allow;
it stays fp32 (with the reason) when its op needs fp32, when a schema fixes its inputs at
``tensor(float)``, or when only fp32 work feeds it. The decision flows down the graph through
``state``, which :mod:`precision_rewrite` then reads to place the Casts.
"""

from __future__ import annotations

import collections
import itertools

import onnx_ir as ir

from txcompile.graph import kernels
from txcompile.graph.nodes import op_key
from txcompile.passes.targets.kernel_check import _version, value_dtypes

LOW, KEPT = "low", "kept"  # a value's state; absent = neutral (graph inputs, weights)
Plan = tuple[list[int], list[int]]  # (input positions, output positions) to lower

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


class PrecisionPlan:
    """Each node's precision, decided in graph order against the target's kernel table."""

    def __init__(self, model: ir.Model, low: ir.DataType, table: kernels.KernelTable, keep_io: bool):
        self.model, self.graph, self.low, self.table, self.keep_io = model, model.graph, low, table, keep_io
        self.low_name = low.name.lower()
        self.dtypes = value_dtypes(model)
        self.state: dict[ir.Value, str] = {}
        self.low_ops: collections.Counter[str] = collections.Counter()
        self.kept: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)
        self.plans: dict[ir.Node, Plan] = {}

    def is_float(self, value: ir.Value | None) -> bool:
        return value is not None and self.dtypes.get(value) == "float"

    def decide_all(self) -> dict[ir.Node, Plan]:
        if not self.keep_io:
            for value in self.graph.inputs:
                if self.is_float(value):
                    value.dtype = self.low
                    self.state[value] = LOW
        for node in list(self.graph):
            plan, reason = self.decide(node)
            if plan is None:
                if reason:
                    self.kept[op_key(node)][reason] += 1
                for value in node.outputs:
                    if self.is_float(value):
                        self.state[value] = KEPT
                        value.dtype = ir.DataType.FLOAT  # make the inferred type explicit
                continue
            self.plans[node] = plan
            self.low_ops[op_key(node)] += 1
            for index in plan[1]:
                self.state[node.outputs[index]] = LOW
        return self.plans

    def decide(self, node: ir.Node) -> tuple[Plan | None, str | None]:
        """(positions to lower, None) or (None, why it stays fp32; None when it has no float)."""
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
        if LOW not in sources and KEPT in sources:
            return None, "fed only by fp32 work"
        return self.kernel_choice(node, floats_in, floats_out)

    def kernel_choice(self, node: ir.Node, floats_in: list[int], floats_out: list[int]):
        """The most type parameters moved to half precision that still have a kernel."""
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
