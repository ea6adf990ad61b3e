"""The residual-stream plan of preln-to-rmsnorm: which weights to center so every LayerNorm
input is zero-mean, found by walking back from each LayerNorm's input to the stream's writers.

The walk (``StreamCentering.plan``) hands each producer to its handler in writers.py; a write
no weight can absorb raises ``NotCenterable`` and is centered explicitly where it joins the
stream; anything that makes the conversion impossible raises ``Refused``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping

import numpy as np
import onnx_ir as ir

from txcompile.passes.norms.common import NORM_OPS, constant, describe, is_op, rank


class Refused(Exception):
    """The graph is not one whose LayerNorms can all become RMSNorms; the message says why."""


class NotCenterable(Refused):
    """A write whose weights cannot absorb the centering; an explicit ``x - mean(x)`` can."""


@dataclasses.dataclass
class Edit:
    """Input ``index`` of ``node`` becomes ``array`` (the centered weight, bias or table)."""

    node: ir.Node
    index: int
    array: np.ndarray
    what: str


@dataclasses.dataclass
class Explicit:
    """Input ``index`` of ``node`` is centered with ``x - mean(x)`` along ``axis``, because ``why``."""

    node: ir.Node
    index: int
    axis: int
    why: str


class StreamCentering:
    """The planned edits, and every stream value (with its centered axis) they make zero-mean."""

    def __init__(self, writers: Mapping[str, Callable]) -> None:
        self.writers = writers  # op type → handler (writers.WRITERS)
        self.edits: list[Edit] = []
        self.values: dict[int, tuple[ir.Value, int]] = {}  # id → (value, centered axis)
        self.nodes: set[ir.Node] = set()
        self.explicit: list[Explicit] = []
        self.norm_starts: set[ir.Node] = set()  # norms whose output begins a stream

    def snapshot(self):
        return len(self.edits), dict(self.values), set(self.nodes), set(self.norm_starts), len(self.explicit)

    def restore(self, snapshot) -> None:
        del self.edits[snapshot[0] :]
        del self.explicit[snapshot[4] :]
        self.values, self.nodes, self.norm_starts = snapshot[1], set(snapshot[2]), set(snapshot[3])

    def plan(self, value: ir.Value, axis: int) -> None:
        """Make ``value`` zero-mean along ``axis`` (non-negative); raise Refused when impossible."""
        seen = self.values.get(id(value))
        if seen is not None:
            if seen[1] != axis:
                raise Refused(f"{value.name} would be centered along two different axes")
            return
        self.values[id(value)] = (value, axis)
        node = value.producer()
        if node is None:
            raise NotCenterable(f"the stream takes graph input {value.name} directly")
        self.nodes.add(node)
        if (node.domain or "", node.op_type) in NORM_OPS:
            self.norm_starts.add(node)
            raise NotCenterable(f"the output of {describe(node)} begins the stream")
        handler = self.writers.get(node.op_type)
        if node.domain not in ("", "ai.onnx") or handler is None:
            raise NotCenterable(f"{describe(node)} writes into the residual stream and cannot be centered")
        handler(self, node, value, axis)

    def operand(self, node: ir.Node, index: int, axis: int) -> None:
        """An input of a broadcasting op: center constants on this edge, recurse otherwise."""
        value, out = node.inputs[index], node.outputs[0]
        offset = rank(out) - rank(value) if rank(value) is not None and rank(out) is not None else None
        if offset is None:
            raise Refused(f"the rank of {value.name} is unknown")
        own = axis - offset
        if own < 0 or value.shape[own] == 1:
            raise Refused(f"{value.name} is broadcast along the hidden axis into {describe(node)}")
        array = constant(value)
        if array is not None:
            self.edit(node, index, array - array.mean(axis=own, keepdims=True), "constant")
            return
        snapshot = self.snapshot()
        try:
            self.plan(value, own)
        except NotCenterable as why:  # center this write explicitly (Whisper's Gelu stem, Swin's norm)
            starts = self.norm_starts
            self.restore(snapshot)
            self.norm_starts = starts  # Post-LN detection needs to know which norms began a stream
            self.explicit.append(Explicit(node, index, own, str(why)))

    def edit(self, node: ir.Node, index: int, array: np.ndarray, what: str) -> None:
        self.edits.append(Edit(node, index, array.astype(constant(node.inputs[index]).dtype), what))

    def outside_reader(self) -> str | None:
        """A value whose mean changes must be read only by the stream itself or by a LayerNorm."""
        for value, axis in self.values.values():
            if value.is_graph_output():
                return f"{value.name} (residual stream) is a graph output"
            for reader in value.consumers():
                if reader in self.nodes or is_op(reader, "Shape", "Size"):
                    continue
                if _normalizes_axis(reader, value, axis):
                    continue  # a LayerNorm over the centered axis does not see the shift
                return f"{value.name} (residual stream) is also read by {describe(reader)}"
        return None


def _normalizes_axis(reader: ir.Node, value: ir.Value, axis: int) -> bool:
    if not is_op(reader, "LayerNormalization") or reader.inputs[0] is not value or rank(value) is None:
        return False
    return axis == rank(value) - 1 and reader.attributes.get_int("axis", -1) % rank(value) == axis
