"""Attention over heads folded into the batch axis (BLOOM's baddbmm, bmm-era code), split back out.

Such a site multiplies [B·N, S, D] queries by [B·N, D, L] keys, adds its biases (ALiBi's
per-head slopes) in that form, views the scores as [B, N, S, L] for the mask and the Softmax,
and views the probabilities back for the [B·N]-batched P·V, whose output is viewed as
[B, N, S, D]. ``split-folded-heads`` rewrites it over [B, N, ...] tensors: the same products
batched differently (exact), so the site reads as any other and a bias added before the view
becomes a [B, N, S|1, L] term of the fused op's attention bias.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx_ir as ir

from txcompile.graph.build import GraphBuilder
from txcompile.graph.nodes import shape_axes
from txcompile.graph.probe import Shapes
from txcompile.passes.attention.sites import (
    SCORE_OPS,
    SEARCH_DEPTH,
    _reaches_matmul,
    _single_use,
    scalar_constant,
)

RULE = "split-folded-heads"
_FOLDED_OPS = ("Add", "Mul", "Div")  # what may sit between the folded Q·Kᵀ and the view


@dataclasses.dataclass
class Folded:
    """One folded site: the 3-D product and ops above the view, the view, and P·V below."""

    softmax: ir.Node
    qk: ir.Node  # MatMul [B·N, S, D] × [B·N, D, L]
    chain: list[tuple[ir.Node, int]]  # (node, index of the score input), from the MatMul up
    view: ir.Node  # Reshape [B·N, S, L] → [B, N, S, L]
    probabilities: ir.Value  # [B, N, S, L], what the view back reads
    pv: ir.Node | None  # MatMul [B·N, S, L] × [B·N, L, D]; None: P·V is over split heads already
    output_view: ir.Node | None  # Reshape [B·N, S, D] → [B, N, S, D]

    def probed(self) -> list[ir.Value]:
        """The values whose shapes the split checks."""
        values = [self.view.inputs[0], self.view.outputs[0], *self.qk.inputs]
        sources = [self.qk.inputs[0], *_key_sources(self.qk.inputs[1])]
        if self.pv is not None:
            values += [self.pv.outputs[0], self.output_view.outputs[0], self.pv.inputs[1]]
            sources.append(self.pv.inputs[1])
        for value in sources:
            producer = value.producer()
            if producer is not None and producer.op_type == "Reshape":
                values.append(producer.inputs[0])
        values += [node.inputs[1 - index] for node, index in self.chain]
        return [v for v in values if v is not None]


def find(graph: ir.Graph) -> tuple[list[Folded], dict[ir.Node, str]]:
    """Every Softmax that reads a view of a folded Q·Kᵀ product (shapes unchecked); and, by
    Softmax, why a folded site cannot be split (a shared value, no P·V found)."""
    found, refused = [], {}
    for node in graph:
        if node.op_type == "Softmax" and node.domain == "":
            folded = _read(node)
            if isinstance(folded, str):
                refused[node] = folded
            elif folded is not None:
                found.append(folded)
    return found, refused


def split(graph: ir.Graph, folded: Folded, shapes: Shapes) -> str | None:
    """Rewrite one folded site over split heads; None when done, else why not (graph unchanged)."""
    try:
        plan = _plan(folded, shapes)
    except _Refused as why:
        return str(why)
    name = folded.softmax.name or "attention"
    scores_side = GraphBuilder(graph, f"{name}/split_heads", folded.view)
    scores = scores_side.op("MatMul", _operand(plan["Q"], scores_side), _operand(plan["Kᵀ"], scores_side))
    _reshape_shape_readers(folded.qk.outputs[0], scores, plan["heads"], scores_side)
    for (node, index), term in zip(folded.chain, plan["terms"], strict=True):
        other = _operand(term, scores_side)
        scores = scores_side.op(node.op_type, *([scores, other] if index == 0 else [other, scores]))
        _reshape_shape_readers(node.outputs[0], scores, plan["heads"], scores_side)
    scores_side.commit()
    ir.convenience.replace_all_uses_with(folded.view.outputs[0], scores, replace_graph_outputs=True)
    scores.shape, scores.type = folded.view.outputs[0].shape, folded.view.outputs[0].type
    if folded.pv is None:
        graph.sort()
        return None
    output_side = GraphBuilder(graph, f"{name}/split_heads_pv", folded.pv)
    product = output_side.op("MatMul", folded.probabilities, _operand(plan["V"], output_side))
    _reshape_shape_readers(folded.pv.outputs[0], product, plan["heads"], output_side)
    output_side.commit()
    product.shape, product.type = folded.output_view.outputs[0].shape, folded.output_view.outputs[0].type
    ir.convenience.replace_all_uses_with(folded.output_view.outputs[0], product, replace_graph_outputs=True)
    graph.sort()  # a rerouted Shape reader may sit before the nodes now feeding it
    return None


def _plan(folded: Folded, shapes: Shapes) -> dict:
    """How each operand becomes its [B, N, ...] form: ("use" | "transpose" | "reshape" |
    "unsqueeze" | "keep", value); raises _Refused with the reason a shape does not fit."""
    scores4 = shapes(folded.view.outputs[0])
    if scores4 is None or len(scores4) != 4:
        raise _Refused("the scores' view is not 4-D")
    batch, heads, seq, keys = scores4
    query = shapes(folded.qk.inputs[0])
    if query is None or len(query) != 3:
        raise _Refused(f"Q is {query}, not [B·N, S, D]")
    head_dim = query[2]
    folded3 = {"scores": (shapes(folded.view.inputs[0]), (batch * heads, seq, keys))}
    if folded.pv is not None:
        output = shapes(folded.output_view.outputs[0])
        if output != (batch, heads, seq, head_dim):
            raise _Refused(f"P·V's output is viewed as {output}, not [B, N, S, D]")
        folded3["P·V products"] = (shapes(folded.pv.outputs[0]), (batch * heads, seq, head_dim))
    for what, (found, wanted) in folded3.items():
        if found != wanted:
            raise _Refused(f"the {what} are {found}, not [B·N, S, ·] = {wanted}")
    terms = []
    for node, index in folded.chain:
        other = node.inputs[1 - index]
        terms.append(
            ("keep", other) if scalar_constant(other) is not None else _bias(other, batch, heads, shapes)
        )
    return {
        "Q": _unfold(folded.qk.inputs[0], (batch, heads, seq, head_dim), shapes, "Q"),
        "Kᵀ": _unfold_key(folded.qk.inputs[1], (batch, heads, keys, head_dim), shapes),
        "V": None
        if folded.pv is None
        else _unfold(folded.pv.inputs[1], (batch, heads, keys, head_dim), shapes, "V"),
        "terms": terms,
        "heads": heads,
    }


def _reshape_shape_readers(folded: ir.Value, split: ir.Value, heads: int, b: GraphBuilder) -> None:
    """Shape readers of a folded value (TorchScript sizes its views from them) read the same
    numbers off its split twin, [B, N, R, C] → [B·N, R, C], so the folded value dies."""
    readers = [use.node for use in folded.uses() if use.node.op_type == "Shape"]
    if not readers:
        return
    batch_heads = b.op("Mul", b.op("Shape", split, start=0, end=1), b.const(np.array([heads], np.int64)))
    whole = b.op("Concat", batch_heads, b.op("Shape", split, start=2), axis=0)
    for reader in readers:
        start = reader.attributes.get_int("start", None)
        end = reader.attributes.get_int("end", None)
        axes = list(shape_axes(start, end, 3))
        numbers = b.op("Gather", whole, b.const(np.array(axes, np.int64)), axis=0)
        ir.convenience.replace_all_uses_with(reader.outputs[0], numbers, replace_graph_outputs=True)


def _operand(step: tuple, b: GraphBuilder) -> ir.Value:
    how, value = step[0], step[1]
    if how == "transpose":
        return b.op("Transpose", value, perm=[0, 1, 3, 2])
    if how == "unsqueeze":
        return b.op("Unsqueeze", value, b.const(np.array([0], np.int64)))
    if how == "reshape":  # [B·N, ...] → [B, N, ...]: N fixed, the batch may vary
        rest = b.op("Shape", value, start=1)
        target = b.op("Concat", b.const(np.array([-1, step[2]], np.int64)), rest, axis=0)
        return b.op("Reshape", value, target)
    return value


class _Refused(Exception):
    pass


def _read(softmax: ir.Node) -> Folded | str | None:
    """The folded site at ``softmax``; None when its scores are no view of a folded product;
    why not when they are, but a value has another reader or P·V is not found below."""
    shared, scores = [], softmax.inputs[0]
    for _ in range(SEARCH_DEPTH):  # the [B, N, S, L] ops between the view and the Softmax
        node = scores.producer()
        if node is None:
            return None
        shared += [] if _single_use(scores) else [scores]
        if node.op_type == "Reshape":
            break
        on_path = [i for i, v in enumerate(node.inputs) if _view_above(v)]
        if node.op_type not in SCORE_OPS or len(on_path) != 1:
            return None
        scores = node.inputs[on_path[0]]
    else:
        return None
    view, chain = node, []
    scores = view.inputs[0]
    for _ in range(SEARCH_DEPTH):  # the [B·N, S, L] ops between the product and the view
        node = scores.producer()
        if node is None:
            return None
        shared += [] if _private(scores) else [scores]
        if node.op_type == "MatMul":
            break
        on_path = [i for i, v in enumerate(node.inputs) if _product_above(v)]
        if (
            node.op_type not in _FOLDED_OPS
            or len(on_path) != 1
            or (node.op_type == "Div" and on_path[0] != 0)
        ):
            return None
        chain.append((node, on_path[0]))
        scores = node.inputs[on_path[0]]
    else:
        return None
    if shared:
        return f"score tensor {shared[-1].name} has another consumer"
    below = _below(softmax)
    if below is None:
        return "no [B·N]-batched P·V reads the probabilities through a view back"
    return Folded(softmax, node, list(reversed(chain)), view, *below)


def _below(softmax: ir.Node) -> tuple[ir.Value, ir.Node | None, ir.Node | None] | None:
    """(the probabilities, P·V, its output view): through no-op Casts, a view back, the MatMul;
    or P·V over split heads already (a static export folds the views around it). Shape
    readers along the way (TorchScript sizes the views from them) die with the folded chain."""
    probabilities = softmax.outputs[0]
    user = _reader(probabilities)
    while user is not None and user.op_type == "Cast" and user.attributes.get_int("to") == ir.DataType.FLOAT:
        probabilities = user.outputs[0]
        user = _reader(probabilities)
    if user is not None and user.op_type == "MatMul" and user.inputs[0] is probabilities:
        return probabilities, None, None
    if user is None or user.op_type != "Reshape":
        return None
    pv = _reader(user.outputs[0])
    if pv is None or pv.op_type != "MatMul" or pv.inputs[0] is not user.outputs[0]:
        return None
    output_view = _reader(pv.outputs[0])
    if output_view is None or output_view.op_type != "Reshape" or output_view.inputs[0] is not pv.outputs[0]:
        return None
    return probabilities, pv, output_view


def _private(value: ir.Value) -> bool:
    """One reader besides Shape nodes (those are rerouted to the split value)."""
    readers = [use for use in value.uses() if use.node.op_type != "Shape"]
    return len(readers) == 1 and not value.is_graph_output()


def _reader(value: ir.Value) -> ir.Node | None:
    """The one reader of ``value`` besides Shape nodes, if it has exactly one."""
    readers = [use.node for use in value.uses() if use.node.op_type != "Shape"]
    return readers[0] if len(readers) == 1 and not value.is_graph_output() else None


def _product_above(value: ir.Value | None) -> bool:
    return _reaches_matmul(value, through=_FOLDED_OPS)


def _view_above(value: ir.Value | None, depth: int = SEARCH_DEPTH) -> bool:
    producer = value.producer() if value is not None else None
    if producer is None or depth == 0:
        return False
    if producer.op_type == "Reshape":
        return _product_above(producer.inputs[0])
    return producer.op_type in SCORE_OPS and any(_view_above(v, depth - 1) for v in producer.inputs)


def _key_sources(key_t: ir.Value) -> list[ir.Value]:
    producer = key_t.producer()
    if producer is not None and producer.op_type == "Transpose":
        return [producer.inputs[0]]
    return [key_t]


def _unfold(value: ir.Value, wanted: tuple, shapes: Shapes, what: str) -> tuple:
    """[B·N, R, C] as [B, N, R, C]: the graph's own 4-D tensor when a Reshape folded it."""
    producer = value.producer()
    if producer is not None and producer.op_type == "Reshape" and shapes(producer.inputs[0]) == wanted:
        return ("use", producer.inputs[0])
    folded = (wanted[0] * wanted[1], *wanted[2:])
    if shapes(value) != folded:
        raise _Refused(f"{what} is {shapes(value)}, not [B·N, ·, ·] = {folded}")
    return ("reshape", value, wanted[1])


def _unfold_key(key_t: ir.Value, key: tuple, shapes: Shapes) -> tuple:
    """Kᵀ [B·N, D, L] as [B, N, D, L]: K [B, N, L, D] transposed, when the graph folded that."""
    producer = key_t.producer()
    if (
        producer is not None
        and producer.op_type == "Transpose"
        and list(producer.attributes.get_ints("perm", [])) == [0, 2, 1]
    ):
        folded = producer.inputs[0].producer()
        if folded is not None and folded.op_type == "Reshape" and shapes(folded.inputs[0]) == key:
            return ("transpose", folded.inputs[0])
    batch, heads, keys, head_dim = key
    return _unfold(key_t, (batch, heads, head_dim, keys), shapes, "Kᵀ")


def _bias(value: ir.Value, batch: int, heads: int, shapes: Shapes) -> tuple:
    """A term added to the folded scores ([B·N | 1, S | 1, L]) as [B | 1, N | 1, S | 1, L]."""
    shape = shapes(value)
    if shape is None or len(shape) != 3:
        raise _Refused(f"a term added to the folded scores is {shape}, not [B·N, S, L]")
    if shape[0] == 1:
        return ("unsqueeze", value)
    if shape[0] != batch * heads:
        raise _Refused(f"a term added to the folded scores has {shape[0]} rows, not B·N = {batch * heads}")
    return ("reshape", value, heads)
