"""The int8 form of one MatMul/Gemm, as a rule (the forms themselves are in int8_matmul.py).

Which products stay fp32 and how each input is scaled (per token or per tensor, smoothed or
not) are whole-model decisions made before the rule runs (quantize.Int8Plan); the rule reads
them from ``Int8State`` and rewrites one linear at a time. An input read by several linears
(Q, K and V) is quantized once, before the first of them; each linear gets its own product.
"""

from __future__ import annotations

import collections
import dataclasses

import onnx_ir as ir

from txcompile.graph.build import GraphBuilder
from txcompile.passes.base import TxPass
from txcompile.passes.rules import Rewrite, Rule
from txcompile.passes.sparsity.linears import Linear, find_linears
from txcompile.passes.targets import int8_matmul

KEPT_FP32 = "kept fp32 for --min-cosine: among the most sensitive products"


@dataclasses.dataclass
class Int8State:
    schemes: dict[str, int8_matmul.Scheme]  # per input value name
    bits: int
    opset: int
    candidates: set[str]  # linears (by key) with a float32 weight
    skip: set[str] = dataclasses.field(default_factory=set)  # kept fp32
    # per input value name: (its emitter, the quantized input, the per-row scale or None)
    inputs: dict[str, tuple[int8_matmul.Emitter, ir.Value, ir.Value | None]] = dataclasses.field(
        default_factory=dict
    )


def linear_key(linear: Linear) -> str:
    """How --min-cosine and the report name a product: its node's name, else its output's."""
    return linear.node.name or linear.node.outputs[0].name


class Int8MatMulRule(Rule):
    """MatMul/Gemm with a constant float32 weight → int8 weights, activations per token
    (MatMulInteger) or per tensor (DynamicQuantizeMatMul), smoothed where the plan says."""

    name = "int8-matmul"

    def match(self, model: ir.Model, state: Int8State):
        return find_linears(model.graph)

    def site_name(self, linear: Linear) -> str:
        return linear_key(linear)

    def check(self, linear: Linear, state: Int8State) -> str | None:
        key = linear_key(linear)
        if key not in state.candidates:
            return f"{linear.matrix().dtype} weight: only float32 is quantized"
        if key in state.skip:
            return KEPT_FP32
        return None

    def rewrite(self, model: ir.Model, linear: Linear, state: Int8State) -> Rewrite:
        graph, node = model.graph, linear.node
        x = node.inputs[0]
        scheme = state.schemes[x.name]
        made = []
        if x.name not in state.inputs:
            builder = GraphBuilder(graph, f"int8_{len(state.inputs)}")
            emitter = int8_matmul.Emitter(builder, state.opset, state.bits)
            quantized, row_scale = emitter.quantize(x, linear.shape[0], scheme)
            made += builder.commit(node)
            state.inputs[x.name] = (emitter, quantized, row_scale)
        emitter, quantized, row_scale = state.inputs[x.name]
        bias = node.inputs[2] if linear.is_gemm and len(node.inputs) > 2 else None
        # per tensor, the bias Add after a MatMul goes into DynamicQuantizeMatMul (ORT's per-row
        # kernel drops a bias it is given: that Add stays, see int8_matmul.Emitter.product)
        folded = (
            int8_matmul.bias_add(node.outputs[0], linear.shape[1])
            if bias is None and not scheme.per_token
            else None
        )
        if folded is not None:
            bias = folded[1]
        out = emitter.product(x, quantized, row_scale, linear.matrix(), scheme.divisor, bias)
        made += emitter.builder.commit(node)
        replace_linear(graph, linear, out, folded[0] if folded else None)
        op = "MatMulInteger" if scheme.per_token else "DynamicQuantizeMatMul"
        extra = {"activations": "per token" if scheme.per_token else "per tensor"}
        extra["smoothed"] = scheme.divisor is not None
        return Rewrite(op, made, extra)


def replace_linear(graph: ir.Graph, linear: Linear, out: ir.Value, bias_add: ir.Node | None = None) -> None:
    """``out`` takes the place (and the name) of the linear's output, or of the bias Add's after
    it when ``out`` has the bias in; the weight goes if unused."""
    node = linear.node
    old = bias_add.outputs[0] if bias_add is not None else node.outputs[0]
    out.type, out.shape = old.type, old.shape
    name = old.name
    ir.convenience.replace_all_uses_with(old, out, replace_graph_outputs=True)
    if bias_add is not None:
        graph.remove(bias_add, safe=True)
    graph.remove(node, safe=True)
    out.name = name  # the product keeps its name: reports and --compare still find it
    if not list(linear.weight.uses()) and not linear.weight.is_graph_output():
        graph.initializers.pop(linear.weight.name, None)


class Tally:
    """Counts and tags for one trial build: the pass keeps those of the build it chooses."""

    def __init__(self) -> None:
        self.rule_counts: collections.Counter[str] = collections.Counter()

    tag = TxPass.tag
