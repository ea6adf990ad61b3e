"""Reading an embedding block: LayerNorm over the sum of 2–3 constant-table lookups.

``match`` walks back from a LayerNormalization (or, after ``fuse-norms``, a
SkipLayerNormalization) through the Adds to the Gathers; ``assign_roles`` decides, from the
probed index shapes, which lookup the fused op takes as words, positions and token types.
"""

from __future__ import annotations

import dataclasses
import itertools

import numpy as np
import onnx_ir as ir

from txcompile.graph.constants import constant_array
from txcompile.graph.nodes import MS_DOMAIN
from txcompile.graph.probe import Shapes

NORMS = {("", "LayerNormalization"), (MS_DOMAIN, "SkipLayerNormalization")}


@dataclasses.dataclass
class Lookup:
    gather: ir.Node
    table: np.ndarray
    unsqueeze: ir.Node | None = None  # Unsqueeze(Gather(P, arange(S)), 0), as plain torch writes positions

    @property
    def ids(self) -> ir.Value:
        return self.gather.inputs[1]

    def ids_shape(self, shapes: Shapes) -> tuple[int, ...] | None:
        """The index shape the fused op sees: Gather(P, ids)[None] = Gather(P, ids[None])."""
        shape = shapes(self.ids)
        return None if shape is None else (1, *shape) if self.unsqueeze else tuple(shape)


@dataclasses.dataclass
class Site:
    norm: ir.Node
    lookups: list[Lookup]
    adds: list[ir.Node]
    total: ir.Value | None  # the embedding sum, when something besides the norm reads it
    reason: str | None = None
    roles: dict[str, Lookup] | None = None  # word / position / segment, once the check assigned them


def match(norm: ir.Node) -> Site | None:
    """The lookups summed into ``norm``, or None when it normalizes anything else."""
    if (norm.domain if norm.domain != "ai.onnx" else "", norm.op_type) not in NORMS:
        return None
    if norm.op_type == "LayerNormalization":
        if norm.attributes.get_int("axis", -1) != -1:
            return None
        unused, summed = norm.outputs[1:], [norm.inputs[0]]
        total = norm.inputs[0]  # also read by the residual path in Pre-LN models (GPT-2)
    else:
        if len(norm.inputs) > 4 and norm.inputs[4] is not None:
            return None  # a bias input: not an embedding sum
        unused, summed = norm.outputs[1:3], list(norm.inputs[:2])
        total = norm.outputs[3] if len(norm.outputs) > 3 else None
    if any(out.uses() or out.is_graph_output() for out in unused):
        return None
    lookups, adds = [], []
    pending = list(summed)
    while pending:
        value = pending.pop()
        producer = value.producer() if value is not None else None
        if producer is None:
            return None
        if producer.op_type == "Add" and producer.domain in ("", "ai.onnx"):
            adds.append(producer)
            pending.extend(producer.inputs)
        elif (lookup := _lookup(producer)) is not None:
            lookups.append(lookup)
        else:
            return None
    if not 2 <= len(lookups) <= 3 or len({lookup.table.shape[1] for lookup in lookups}) != 1:
        return None
    read_elsewhere = total is not None and _read_elsewhere(total, norm)
    site = Site(norm, lookups, adds, total if read_elsewhere else None)
    inner = [a.outputs[0] for a in adds if a.outputs[0] is not site.total]
    shared_lookup = any(
        len(_value_users(lookup.gather)) != 1
        or lookup.gather.outputs[0].is_graph_output()
        or (lookup.unsqueeze is not None and len(lookup.unsqueeze.outputs[0].uses()) != 1)
        for lookup in lookups
    )
    if shared_lookup or any(len(value.uses()) != 1 or value.is_graph_output() for value in inner):
        site.reason = "an intermediate value has another consumer"
    elif site.total is not None and site.total.is_graph_output():
        site.reason = "the embedding sum is a graph output"
    elif any(lookup.table.dtype != np.float32 for lookup in lookups):
        site.reason = "the embedding tables are not float32"
    return site


def _lookup(node: ir.Node) -> Lookup | None:
    """Gather(table, ids) from a constant 2-D table, possibly under Unsqueeze(axes=[0])."""
    unsqueeze = None
    if node.op_type == "Unsqueeze" and node.domain in ("", "ai.onnx"):
        axes = constant_array(node.inputs[1]) if len(node.inputs) > 1 else None
        if axes is None or [int(a) for a in axes.reshape(-1)] != [0] or node.inputs[0].producer() is None:
            return None
        unsqueeze, node = node, node.inputs[0].producer()
    if (
        node.op_type != "Gather"
        or node.domain not in ("", "ai.onnx")
        or node.attributes.get_int("axis", 0) != 0
    ):
        return None
    table = constant_array(node.inputs[0])
    if table is None or table.ndim != 2:
        return None
    return Lookup(node, table, unsqueeze)


def _read_elsewhere(value: ir.Value, norm: ir.Node) -> bool:
    """Whether anything but ``norm`` reads ``value``."""
    return value.is_graph_output() or any(user is not norm for user, _ in value.uses())


def _value_users(gather: ir.Node) -> list[ir.Node]:
    """Users that read the lookup's values; Shape readers (TorchScript takes the sequence length
    from the embedded tensor) are rebuilt from the indices' shape instead."""
    return [user for user, _ in gather.outputs[0].uses() if user.op_type != "Shape"]


def assign_roles(site: Site, shapes: Shapes) -> dict[str, Lookup] | None:
    """word (ids [B, S]), position (ids [1|B, S] or [S]), segment (ids shaped like word's).

    The sum is the same whichever lookup plays which role; the op only needs the index shapes
    to fit. Larger tables are tried as the word table first.
    """
    ordered = sorted(site.lookups, key=lambda lookup: -lookup.table.shape[0])
    for word, position, *others in itertools.permutations(ordered):
        word_shape, position_shape = word.ids_shape(shapes), position.ids_shape(shapes)
        if word_shape is None or len(word_shape) != 2 or position_shape is None:
            continue
        if tuple(position_shape) not in ((word_shape[1],), (1, word_shape[1]), tuple(word_shape)):
            continue
        if all(other.ids_shape(shapes) == word_shape for other in others):
            return {"word": word, "position": position} | ({"segment": others[0]} if others else {})
    return None
