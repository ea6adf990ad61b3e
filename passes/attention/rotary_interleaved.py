"""Interleaved RoPE (GPT-J's rotate_every_two) → RotaryEmbedding(interleaved=1).

GPT-J and its kin rotate the pairs (x₀, x₁), (x₂, x₃), …: x·cos + rotate_every_two(x)·sin with
rotate_every_two(x) = stack(−x[..., 1::2], x[..., ::2]).flatten(-2), and cos/sin the half
tables repeated element-wise (repeat_interleave). That is RotaryEmbedding with
``interleaved=1`` over the half tables. x comes [B, S, N, D] (GPT-J rotates before it moves
the heads) or [B, N, S, D]; the half tables have a row per position, shared or per batch row.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx_ir as ir

from txcompile.graph.build import GraphBuilder
from txcompile.graph.constants import constant_array
from txcompile.graph.nodes import MS_DOMAIN
from txcompile.graph.probe import Shapes

RULE = "rotary-interleaved"


@dataclasses.dataclass
class Site:
    add: ir.Node
    x: ir.Value
    rotated: ir.Value  # rotate_every_two(x)
    cos: ir.Value  # the tables x is multiplied with: [B|1, S, 1, D] or [B|1, 1, S, D]
    sin: ir.Value
    cos_half: ir.Value | None  # the half tables before their repeat_interleave (same order)
    sin_half: ir.Value | None
    inner: list[ir.Node]  # the rotation's and products' nodes: none may have another reader
    reason: str | None = None


def match(add: ir.Node) -> Site | None:
    """The interleaved RoPE structure around ``add``, or None when it is not one."""
    if add.op_type != "Add" or add.domain not in ("", "ai.onnx") or len(add.inputs) != 2:
        return None
    products = [v.producer() if v is not None else None for v in add.inputs]
    if any(p is None or p.op_type != "Mul" for p in products):
        return None
    for rotated_product, plain_product in (products, products[::-1]):
        for i in (0, 1):
            found = _every_two(rotated_product.inputs[i])
            if found is None or found[0] not in plain_product.inputs:
                continue
            x, rotation = found
            cos = plain_product.inputs[1 - list(plain_product.inputs).index(x)]
            cos_half, sin_half = _halves(cos), _halves(rotated_product.inputs[1 - i])
            sin = rotated_product.inputs[1 - i]
            site = Site(add, x, rotated_product.inputs[i], cos, sin, cos_half, sin_half, [])
            if cos_half is None or sin_half is None:
                site.reason = "cos/sin are not repeat_interleave of half tables"
            site.inner = [*rotation, rotated_product, plain_product]
            return site
    return None


def check(site: Site, shapes: Shapes) -> str | None:
    """None when the site fuses exactly; else why not."""
    if site.reason:
        return site.reason
    x, cos, sin = shapes(site.x), shapes(site.cos), shapes(site.sin)
    if x is None or len(x) != 4 or cos is None or cos != sin or len(cos) != 4 or cos[-1] != x[-1]:
        return f"x is not 4-D with 4-D tables as wide (x {x}, cos {cos}, sin {sin})"
    halves = [shapes(site.cos_half), shapes(site.sin_half)]
    if any(h is None or h[-1] * 2 != x[-1] or int(np.prod(h)) * 2 != int(np.prod(cos)) for h in halves):
        return f"the half tables {halves} are not half of the tables {cos}"
    if _heads_axis(x, cos) is None:
        return f"the tables {cos} are not one row per position shared by every head of x {x}"
    if site.add.outputs[0].is_graph_output():
        return "the rotated value is a graph output"
    if any(_readers(n.outputs[0]) != 1 or n.outputs[0].is_graph_output() for n in site.inner):
        return "an intermediate value has another consumer"
    return None


def rewrite(graph: ir.Graph, site: Site, shapes: Shapes, prefix: str, caches: dict) -> list[ir.Node]:
    """RotaryEmbedding(interleaved=1) over x as [B, S, N·D], the half tables flattened to one
    row per (table row, position) and indexed by b·S + s (s alone for a shared table)."""
    x, cos = shapes(site.x), shapes(site.cos)
    heads_axis = _heads_axis(x, cos)
    heads, half = x[heads_axis], cos[-1] // 2
    b = GraphBuilder(graph, prefix, anchor=site.add)
    key = (site.cos_half.name, site.sin_half.name, heads_axis)
    if key not in caches:  # Q and K of a layer (and every layer) rotate by the same tables
        rows = b.const(np.array([-1, half], np.int64))
        cos_cache, sin_cache = (b.op("Reshape", v, rows) for v in (site.cos_half, site.sin_half))
        caches[key] = (cos_cache, sin_cache, _positions(b, site.cos, site.x, 2 if heads_axis == 1 else 1))
    cos_cache, sin_cache, positions = caches[key]
    value = site.x if heads_axis == 1 else b.op("Reshape", site.x, b.const(np.array([0, 0, -1], np.int64)))
    rotated = b.op(
        "RotaryEmbedding",
        value,
        positions,
        cos_cache,
        sin_cache,
        domain=MS_DOMAIN,
        interleaved=1,
        num_heads=heads,
    )
    if heads_axis != 1:
        rotated = b.op("Reshape", rotated, b.op("Shape", site.x))
    nodes = b.commit()
    ir.convenience.replace_all_uses_with(site.add.outputs[0], rotated)
    return nodes


def _readers(value: ir.Value) -> int:
    """Readers besides Shape nodes: TorchScript sizes the flatten from the stacked pairs' Shape,
    which dies with the rotation."""
    return sum(1 for use in value.uses() if use.node.op_type != "Shape")


def _heads_axis(x: tuple, table: tuple) -> int | None:
    """The axis of x that the tables broadcast over (1 for [B, N, S, D], 2 for [B, S, N, D])."""
    if table[0] not in (1, x[0]):
        return None
    for heads, seq in ((1, 2), (2, 1)):
        if table[heads] == 1 and table[seq] == x[seq]:
            return heads
    return None


def _positions(b: GraphBuilder, table: ir.Value, x: ir.Value, seq_axis: int) -> ir.Value:
    """Position ids [B, S] into the flattened table: b·S + s per row, or s for a shared table."""
    seq = b.op("Shape", x, start=seq_axis, end=seq_axis + 1)
    rows = b.op("Shape", table, start=0, end=1)
    count = b.op("Squeeze", b.op("Mul", rows, seq), b.const(np.array([0], np.int64)))
    flat = b.op("Range", b.const(np.array(0, np.int64)), count, b.const(np.array(1, np.int64)))
    positions = b.op("Reshape", flat, b.op("Concat", rows, seq, axis=0))
    batch = b.op("Shape", x, start=0, end=1)
    return b.op("Expand", positions, b.op("Concat", batch, seq, axis=0))


def _every_two(value: ir.Value | None) -> tuple[ir.Value, list[ir.Node]] | None:
    """(x, the rotation's nodes) when ``value`` is Reshape(Concat(Unsqueeze(−x[..., 1::2], −1),
    Unsqueeze(x[..., ::2], −1), axis=−1)) back to x's shape."""
    reshape = value.producer() if value is not None else None
    if reshape is None or reshape.op_type != "Reshape":
        return None
    concat = reshape.inputs[0].producer()
    if concat is None or concat.op_type != "Concat" or len(concat.inputs) != 2:
        return None
    if (
        concat.attributes.get_int("axis", 0) != -1
        and concat.attributes.get_int("axis", 0) != _rank(concat) - 1
    ):
        return None
    unsqueezes = [v.producer() for v in concat.inputs]
    if any(
        u is None or u.op_type != "Unsqueeze" or _ints(u.inputs[1]) not in ([-1], [_rank(u)])
        for u in unsqueezes
    ):
        return None
    neg, even = (u.inputs[0].producer() for u in unsqueezes)
    if neg is None or neg.op_type != "Neg" or even is None:
        return None
    odd = neg.inputs[0].producer()
    if not (_strided(odd, 1) and _strided(even, 0)) or odd.inputs[0] is not even.inputs[0]:
        return None
    return even.inputs[0], [reshape, concat, *unsqueezes, neg, odd, even]


def _strided(node: ir.Node | None, start: int) -> bool:
    """Whether ``node`` is x[..., start::2] (a Slice along the last axis, step 2, to the end)."""
    if node is None or node.op_type != "Slice" or len(node.inputs) < 5:
        return False
    starts, ends, axes, steps = (_ints(v) for v in node.inputs[1:5])
    rank = node.inputs[0].shape.rank() if node.inputs[0].shape is not None else None
    last = axes == [-1] or (rank is not None and axes == [rank - 1])
    return starts == [start] and steps == [2] and last and ends is not None and ends[0] >= 2**31


def _halves(value: ir.Value) -> ir.Value | None:
    """h when ``value`` is repeat_interleave(h, 2) on the last axis: Reshape(Expand(Unsqueeze(h),
    [1, …, 2])) as dynamo writes it, or Reshape(Tile(Unsqueeze(h), [1, …, 2])) as TorchScript
    does, the Unsqueeze adding the last axis (and perhaps the heads axis)."""
    reshape = value.producer()
    if reshape is None or reshape.op_type != "Reshape":
        return None
    repeat = reshape.inputs[0].producer()
    if repeat is None or repeat.op_type not in ("Expand", "Tile"):
        return None
    target, unsqueeze = _ints(repeat.inputs[1]), repeat.inputs[0].producer()
    if target is None or target[-1] != 2 or any(t != 1 for t in target[:-1]):
        return None
    if unsqueeze is None or unsqueeze.op_type != "Unsqueeze":
        return None
    axes = _ints(unsqueeze.inputs[1]) or []
    if -1 not in axes and (len(target) - 1) not in axes:
        return None
    return unsqueeze.inputs[0]


def _rank(node: ir.Node) -> int | None:
    shape = node.outputs[0].shape
    return shape.rank() - 1 if shape is not None else None


def _ints(value: ir.Value | None) -> list[int] | None:
    array = constant_array(value)
    return None if array is None else [int(v) for v in array.reshape(-1)]
