"""Reading a RoPE site: the x·cos + rotate_half(x)·sin structure, and whether it fuses exactly.

Exporters write rotate_half(x) = [−x₂, x₁] with two Slices, a Neg and a Concat, and cos/sin
as Cos/Sin(Concat(θ, θ)) (times a scaling factor); a static export folds them into constants,
whose values then show the halves repeat. ``match`` finds the structure around an Add;
``check`` says, from the probed shapes, why a site cannot become RotaryEmbedding.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import numpy as np
import onnx_ir as ir

from txcompile.graph.constants import constant_array, constant_scalar
from txcompile.graph.probe import Shapes

# what may sit between Cos/Sin(Concat(θ, θ)) and the product with x without breaking the
# "second half repeats the first" property: reshaping and per-element scaling by a scalar
TRANSPARENT = {"Unsqueeze", "Reshape", "Squeeze", "Cast", "Identity"}


@dataclasses.dataclass
class Site:
    add: ir.Node
    x: ir.Value
    cos: ir.Value  # the operand multiplied with x: cos broadcast to x's shape
    sin: ir.Value
    half_slices: tuple[ir.Node, ir.Node]  # Slice giving x₁ (first half), Slice giving x₂
    concat: ir.Node  # Concat(−x₂, x₁)
    reason: str | None = None


def match(add: ir.Node) -> Site | None:
    """The RoPE structure around ``add``, or None when it is not one (no reason: not a site)."""
    if add.op_type != "Add" or add.domain not in ("", "ai.onnx") or len(add.inputs) != 2:
        return None
    products = [value.producer() if value is not None else None for value in add.inputs]
    if any(p is None or p.op_type != "Mul" for p in products):
        return None
    for rotated_product, plain_product in (products, products[::-1]):
        for i in (0, 1):
            halves = _rotate_half(rotated_product.inputs[i])
            if halves is None:
                continue
            x, slices, concat = halves
            sin = rotated_product.inputs[1 - i]
            if x not in plain_product.inputs:
                continue
            cos = plain_product.inputs[1 - list(plain_product.inputs).index(x)]
            site = Site(add, x, cos, sin, slices, concat)
            if add.outputs[0].is_graph_output():
                site.reason = "the rotated value is a graph output"
            return site
    return None


def _rotate_half(value: ir.Value | None) -> tuple[ir.Value, tuple[ir.Node, ir.Node], ir.Node] | None:
    """x and its two half Slices when ``value`` is Concat(Neg(x[..., h:]), x[..., :h])."""
    concat = value.producer() if value is not None else None
    if concat is None or concat.op_type != "Concat" or len(concat.inputs) != 2:
        return None
    neg, first = (v.producer() for v in concat.inputs)
    if neg is None or neg.op_type != "Neg" or first is None or first.op_type != "Slice":
        return None
    second = neg.inputs[0].producer()
    if second is None or second.op_type != "Slice" or second.inputs[0] is not first.inputs[0]:
        return None
    return first.inputs[0], (first, second), concat


def check(site: Site, shapes: Shapes, tables: Mapping[str, np.ndarray] | None = None) -> str | None:
    """None when the site can be fused exactly; else the first check that failed. ``tables``:
    the values of cos/sin that no graph input reaches (a static export folds them)."""
    x_shape, cos_shape, sin_shape = shapes(site.x), shapes(site.cos), shapes(site.sin)
    if x_shape is None or len(x_shape) != 4:
        return f"x is not [batch, heads, seq, head_size] (shape {x_shape})"
    head_size = x_shape[-1]
    if head_size % 2:
        return f"odd head size {head_size}"
    last = len(x_shape) - 1
    half = head_size // 2
    first, second = (_slice(node, last, shapes) for node in site.half_slices)
    if first is None or second is None:
        return "the halves are not Slices along the last axis with step 1"
    if first != (0, half) or second != (half, head_size):
        return f"the slices take {first} and {second} of {head_size} (partial rotary, or not halves)"
    axis = site.concat.attributes.get_int("axis", 0)
    if axis not in (-1, last):
        return f"rotate_half concatenates on axis {axis}, not the last"
    for name, shape in (("cos", cos_shape), ("sin", sin_shape)):
        if shape is None or tuple(shape[-2:]) != tuple(x_shape[-2:]) or len(shape) > 4:
            return f"{name} is not one row per position (shape {shape})"
        batch = (1, x_shape[0])
        if (len(shape) == 4 and (shape[1] != 1 or shape[0] not in batch)) or (
            len(shape) == 3 and shape[0] != 1
        ):
            return f"{name} is not one row per position shared by every head (shape {shape})"
    cos_angles, sin_angles = _angles(site.cos, "Cos"), _angles(site.sin, "Sin")
    folded = [(tables or {}).get(v.name) for v in (site.cos, site.sin)]
    if (cos_angles is None or sin_angles is None) and all(t is not None for t in folded):
        if not all(np.array_equal(t[..., :half], t[..., half:]) for t in folded):
            return "the folded cos/sin tables' two halves differ (not rotate_half's RoPE)"
    elif cos_angles is None or sin_angles is None:
        return "cos/sin are not Cos/Sin of Concat(θ, θ) (the two halves may differ)"
    elif cos_angles is not sin_angles:
        return "cos and sin are computed from different angles"
    inner = [site.concat, *site.half_slices, site.half_slices[1].outputs[0].uses()[0][0]]
    inner += [value.producer() for value in site.add.inputs]
    if any(len(node.outputs[0].uses()) != 1 or node.outputs[0].is_graph_output() for node in inner):
        return "an intermediate value has another consumer"
    return None


def folded_tables(site: Site) -> list[ir.Value]:
    """cos and sin when neither is Cos/Sin of angles but both are constants a graph input never
    reaches (a static export folds the tables): their values say whether the halves repeat."""
    if _angles(site.cos, "Cos") is not None and _angles(site.sin, "Sin") is not None:
        return []
    values = [site.cos, site.sin]
    return values if all(_input_free(v) for v in values) else []


def _input_free(value: ir.Value, limit: int = 64) -> bool:
    """Whether ``value`` is computed from initializers and constants alone."""
    pending, seen = [value], set()
    while pending:
        value = pending.pop()
        if value is None or value in seen or value.const_value is not None:
            continue
        seen.add(value)
        producer = value.producer()
        if producer is None or len(seen) > limit:
            return False  # a graph input, or too far to tell
        pending.extend(producer.inputs)
    return True


def shared_by_rows(site: Site, shapes: Shapes) -> bool:
    """Whether cos/sin are one table for every batch row: seen so on a verification batch of
    several rows. Otherwise (one row per batch row, as where position ids are an input, or a
    one-row batch that cannot tell) the fusion indexes them per row."""
    cos, x = shapes(site.cos), shapes(site.x)
    return cos is not None and x is not None and (len(cos) < len(x) or cos[0] == 1) and x[0] > 1


def _slice(node: ir.Node, last_axis: int, shapes: Shapes) -> tuple[int, int] | None:
    """[start, end) of a step-1 Slice along the last axis, else None.

    TorchScript computes one bound from the runtime shape (x.shape[-1] // 2): the other bound is
    then a constant and the slice's width, measured, gives the rest.
    """
    inputs = [*node.inputs[1:], None, None, None, None][:4]
    starts, ends, axes, steps = (_ints(v) for v in inputs)
    width = shapes(node.outputs[0])
    source = shapes(node.inputs[0])
    if axes is None or len(axes) != 1 or axes[0] not in (-1, last_axis) or width is None or source is None:
        return None
    if inputs[3] is not None and steps != [1]:
        return None
    size, width = source[-1], width[-1]
    if starts is not None and len(starts) == 1:
        start = starts[0] + size if starts[0] < 0 else min(starts[0], size)
        return start, start + width
    if ends is not None and len(ends) == 1:
        end = ends[0] + size if ends[0] < 0 else min(ends[0], size)
        return end - width, end
    return None


def _ints(value: ir.Value | None) -> list[int] | None:
    array = constant_array(value)
    return None if array is None else [int(v) for v in array.reshape(-1)]


def _angles(value: ir.Value, trig: str) -> ir.Value | None:
    """θ when ``value`` is (reshaped, scaled) trig(Concat(θ, θ)) along the last axis."""
    producer = value.producer()
    while producer is not None and producer.op_type != trig:
        if producer.op_type in TRANSPARENT:
            if producer.op_type in ("Reshape", "Squeeze", "Unsqueeze") and not _keeps_last_axis(producer):
                return None
            value = producer.inputs[0]
        elif producer.op_type in ("Mul", "Div") and constant_scalar(producer.inputs[1]) is not None:
            value = producer.inputs[0]
        elif producer.op_type == "Mul" and constant_scalar(producer.inputs[0]) is not None:
            value = producer.inputs[1]
        else:
            return None
        producer = value.producer()
    if producer is None:
        return None
    concat = producer.inputs[0].producer()
    if concat is None or concat.op_type != "Concat" or len(concat.inputs) != 2:
        return None
    axis, shape = concat.attributes.get_int("axis", 0), concat.inputs[0].shape
    along_last = axis == -1 or (shape is not None and axis == shape.rank() - 1)
    if concat.inputs[0] is not concat.inputs[1] or not along_last:
        return None
    return concat.outputs[0]


def _keeps_last_axis(node: ir.Node) -> bool:
    """Reshape/Squeeze/Unsqueeze that leave the last axis whole (they only add or drop 1s)."""
    if node.op_type == "Reshape":
        target = constant_array(node.inputs[1])
        source = node.inputs[0].shape
        if target is None or source is None or source.rank() == 0:
            return False
        dims = target.reshape(-1)
        return len(dims) > 0 and int(dims[-1]) == source[-1] and isinstance(source[-1], int)
    axes = constant_array(node.inputs[1]) if len(node.inputs) > 1 else None
    if axes is None:
        return False
    return all(int(a) != -1 for a in axes.reshape(-1))
