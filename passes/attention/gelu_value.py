"""GELU in any arrangement: the elementwise region around a Tanh or Erf, recognised by its values.

Models and exporters write the GELU formulas in more orders than patterns can list: BLOOM's
0.5·x·(1 + tanh(0.79788456·x·(1 + 0.044715·x·x))), TorchScript's gelu(approximate="tanh")
below opset 20, hand-written variants. For a Tanh / Erf the patterns left alone, the region is
every elementwise node with scalar constants between one input ``x`` and an output ``y`` a few
nodes downstream; it is GELU when ``y(x)`` equals GELU(x) on sample points. ``x`` is the value
closest to ``y`` that every path of the region runs through (x·0.5 and the Tanh's argument both
read it).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import numpy as np
import onnx_ir as ir

from txcompile.graph.constants import constant_array
from txcompile.graph.nodes import MS_DOMAIN

_OPS: dict[str, Callable] = {
    "Add": np.add,
    "Sub": np.subtract,
    "Mul": np.multiply,
    "Div": np.divide,
    "Pow": np.power,
    "Neg": np.negative,
    "Sqrt": np.sqrt,
    "Reciprocal": np.reciprocal,
    "Tanh": np.tanh,
    "Erf": np.vectorize(math.erf),
}
ANCHORS = ("Tanh", "Erf")
_DTYPES = (ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.BFLOAT16)
_POINTS = np.linspace(-6.0, 6.0, 121)
_TOLERANCE = 1e-5  # tanh- and erf-GELU differ by up to 2e-4 on these points
_MAX_NODES = 24
_CHAIN = 4  # how far below the Tanh / Erf the output may be


def _erf_gelu(x):
    return 0.5 * x * (1.0 + _OPS["Erf"](x / math.sqrt(2.0)))


def _tanh_gelu(x):
    return 0.5 * x * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))


# the op each form becomes (com.microsoft: ORT's fp32 CPU kernels), with its reference
FORMS = (("tanh", "FastGelu", _tanh_gelu), ("erf", "Gelu", _erf_gelu))


@dataclasses.dataclass
class Region:
    x: ir.Value
    output: ir.Value
    nodes: list[ir.Node]
    form: str
    op_type: str
    max_diff: float


def find(anchor: ir.Node) -> Region | str:
    """The GELU region around ``anchor`` (a Tanh or Erf), or why there is none."""
    closest = (math.inf, "")
    for output in _outputs_below(anchor):
        nodes = _closure(output)
        x = _nearest_dominator(output, nodes, anchor)
        if x is None:
            continue
        region = _closure(output, stop=x)
        values = _evaluate(region, x)
        if values is None:
            continue
        for form, op_type, reference in FORMS:
            diff = float(np.max(np.abs(values - reference(_POINTS))))
            if diff <= _TOLERANCE:
                return _problem(region, x, output) or Region(x, output, region, form, op_type, diff)
            closest = min(closest, (diff, form))
    if math.isinf(closest[0]):
        return "no elementwise region from one input through it"
    return f"the elementwise region around it is not GELU (max diff {closest[0]:.2g} from {closest[1]}-GELU)"


def rewrite(graph: ir.Graph, region: Region, name: str) -> ir.Node:
    """``y`` := FastGelu(x) / Gelu(x); the region goes."""
    node = ir.node(region.op_type, [region.x], domain=MS_DOMAIN, name=name)
    node.outputs[0].shape, node.outputs[0].type = region.output.shape, region.output.type
    graph.insert_before(region.nodes[-1], node)
    ir.convenience.replace_all_uses_with(region.output, node.outputs[0], replace_graph_outputs=True)
    if region.output.is_graph_output():
        node.outputs[0].name, region.output.name = region.output.name, None
    graph.remove(region.nodes, safe=True)
    return node


def _outputs_below(anchor: ir.Node) -> list[ir.Value]:
    """The anchor's output and the next few single-reader elementwise outputs after it."""
    found, value = [], anchor.outputs[0]
    for _ in range(_CHAIN):
        uses = list(value.uses())
        if len(uses) != 1 or value.is_graph_output():
            break
        node = uses[0].node
        if not _elementwise(node):
            break
        value = node.outputs[0]
        found.append(value)
    return found


def _elementwise(node: ir.Node) -> bool:
    """An op of the table whose constant inputs are all one element (no broadcast of a vector)."""
    if node.domain not in ("", "ai.onnx") or node.op_type not in _OPS or len(node.outputs) != 1:
        return False
    return all(
        value is not None and (constant_array(value) is None or constant_array(value).size == 1)
        for value in node.inputs
    )


def _closure(output: ir.Value, stop: ir.Value | None = None) -> list[ir.Node]:
    """The elementwise nodes ``output`` is computed by, in graph order, not crossing ``stop``."""
    seen: dict[ir.Node, None] = {}
    pending = [output]
    while pending and len(seen) <= _MAX_NODES:
        value = pending.pop()
        node = value.producer()
        if value is stop or node is None or node in seen or not _elementwise(node):
            continue
        seen[node] = None
        pending.extend(v for v in node.inputs if constant_array(v) is None)
    order = {node: i for i, node in enumerate(output.graph)} if output.graph is not None else {}
    return sorted(seen, key=lambda n: order.get(n, 0))


def _leaves(nodes: list[ir.Node]) -> set[ir.Value]:
    made = {out for node in nodes for out in node.outputs}
    return {v for node in nodes for v in node.inputs if v not in made and constant_array(v) is None}


def _nearest_dominator(output: ir.Value, nodes: list[ir.Node], anchor: ir.Node) -> ir.Value | None:
    """The value nearest ``output`` that every path back through the region crosses, above the anchor."""
    inside = [out for node in reversed(nodes) for out in node.outputs]
    for value in [*inside, *_leaves(nodes)]:
        if value is output or value in anchor.outputs:
            continue
        region = _closure(output, stop=value)
        if anchor in region and _leaves(region) == {value}:
            return value
    return None


def _evaluate(nodes: list[ir.Node], x: ir.Value) -> np.ndarray | None:
    """The region's output on the sample points (constants are single elements: see _elementwise)."""
    values: dict[ir.Value, np.ndarray] = {x: _POINTS}
    with np.errstate(all="ignore"):
        for node in nodes:
            if any(v not in values and constant_array(v) is None for v in node.inputs):
                return None
            args = [
                values[v] if v in values else float(constant_array(v).reshape(-1)[0]) for v in node.inputs
            ]
            values[node.outputs[0]] = _OPS[node.op_type](*args)
    result = values[nodes[-1].outputs[0]]
    return result if np.all(np.isfinite(result)) else None


def _broadcasts(nodes: list[ir.Node], x: ir.Value) -> bool:
    """Whether a constant has more axes than ``x``, so that the region's output has more than FastGelu's."""
    rank = x.shape.rank() if x.shape is not None else None
    for node in nodes:
        for value in node.inputs:
            array = constant_array(value)
            if array is not None and array.ndim > (1 if rank is None else rank):
                return True
    return False


def _problem(nodes: list[ir.Node], x: ir.Value, output: ir.Value) -> str | None:
    """Why a region whose values are GELU's cannot become one node."""
    if x.dtype not in _DTYPES:
        return f"GELU of {x.dtype} has no com.microsoft kernel"
    if _broadcasts(nodes, x):
        return "a constant broadcasts the output to more axes than the input"
    inside = set(nodes)
    for node in nodes:
        for value in node.outputs:
            if value is not output and (
                value.is_graph_output() or any(u.node not in inside for u in value.uses())
            ):
                return f"{value.name} inside the GELU formula has another reader"
    return None
