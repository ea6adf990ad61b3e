"""The rewrite of remove-padding: gathers, packed attention ops and restores, as a plan asks.

:class:`TokenIndex` computes once where each real token goes ([B·S] → [T]) and back; the
:class:`PaddingRewriter` packs the plan's seeds, moves the region onto packed values and gives
the padded layout back to every reader that needs it. All nodes are emitted through one
:class:`Emitter`, so their order and the constants' names do not depend on who asked first.
"""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import onnx_ir as ir

from txcompile.graph.nodes import op_key
from txcompile.graph.ort import PADDED_OUTPUTS_KEY
from txcompile.passes.attention.padding_layout import ATTENTION, LAST_AXIS_REDUCTIONS, MS, TokenLayout
from txcompile.passes.attention.padding_plan import PaddingPlan

PACKED_ATTRIBUTES = {
    "PackedAttention": ("num_heads", "qkv_hidden_sizes", "scale"),
    "PackedMultiHeadAttention": ("num_heads", "scale", "mask_filter_value"),
}
LAST_AXIS_NORMS = ("LayerNormalization", "RMSNormalization", "SimplifiedLayerNormalization", "Split")


class Emitter:
    """Collects new nodes (inserted together at the end) and names constants in order."""

    def __init__(self, graph: ir.Graph):
        self.graph = graph
        self.nodes: list[ir.Node] = []
        self._consts = 0

    def op(self, op_type: str, inputs, attributes=None, domain: str = "") -> ir.Value:
        node = ir.node(op_type, inputs, attributes or {}, domain=domain)
        self.nodes.append(node)
        return node.outputs[0]

    def const(self, array) -> ir.Value:
        self._consts += 1
        value = ir.val(f"txcompile_padding_c{self._consts}", const_value=ir.tensor(np.asarray(array)))
        self.graph.register_initializer(value)
        return value


class TokenIndex:
    """The real tokens' rows in the flattened [B·S] layout (``index``), and for each of the B·S
    rows its packed row — T, one past the last, for a padded one (``inverse``)."""

    def __init__(self, emit: Emitter, mask: ir.Value):
        self.emit, self.mask = emit, mask
        op, const = emit.op, emit.const
        self.mask_shape = op("Shape", [mask])
        flat = op("Reshape", [mask, const(np.array([-1]))])
        keep = op("Cast", [flat], {"to": ir.DataType.BOOL})
        self.index = op("Squeeze", [op("NonZero", [keep]), const(np.array([0]))])
        count = op("Shape", [self.index])
        self.ones = op("Cast", [keep], {"to": ir.DataType.INT64})  # [B·S], 1 per real token
        row = op("Sub", [op("CumSum", [self.ones, const(np.array(0))]), const(np.array(1))])
        self.inverse = op("Reshape", [op("Where", [keep, row, count]), self.mask_shape])
        self._lengths: tuple[ir.Value, ir.Value] | None = None

    def lengths(self) -> tuple[ir.Value, ir.Value]:
        """(token_offset [B, S], cumulative_sequence_length [B + 1]) as the packed kernels read them:
        the k-th real token of row b goes to b·S + k, as if every row were right-padded. Positions
        are already in the hidden states, so attention does not care which side was padded."""
        if self._lengths is None:
            op, const, int32 = self.emit.op, self.emit.const, ir.DataType.INT32
            real = op("Reshape", [self.ones, self.mask_shape])
            counts = op("ReduceSum", [real, const(np.array([1]))], {"keepdims": 0})
            seq = op("Squeeze", [op("Shape", [self.mask], {"start": 1, "end": 2})])
            positions = op("Range", [const(np.array(0)), seq, const(np.array(1))])
            row = op("Unsqueeze", [positions, const(np.array([0]))])
            filled = op("Less", [row, op("Unsqueeze", [counts, const(np.array([1]))])])
            flat = op("Reshape", [filled, const(np.array([-1]))])
            order = op("Concat", [op("NonZero", [flat]), op("NonZero", [op("Not", [flat])])], {"axis": 1})
            offsets = op("Reshape", [op("Cast", [order], {"to": int32}), self.mask_shape])
            ends = op("CumSum", [op("Cast", [counts], {"to": int32}), const(np.array(0))])
            starts = op("Concat", [const(np.array([0], np.int32)), ends], {"axis": 0})
            self._lengths = (offsets, starts)
        return self._lengths


class PaddingRewriter:
    """Applies a :class:`PaddingPlan`; counts what it made in ``rule_counts``."""

    def __init__(self, model: ir.Model, mask: ir.Value, layout: TokenLayout, rule_counts: Counter):
        self.model, self.graph, self.mask = model, model.graph, mask
        self.layout, self.rule_counts = layout, rule_counts
        self.emit = Emitter(model.graph)
        self.tokens = TokenIndex(self.emit, mask)
        self.restored: dict[ir.Value, ir.Value] = {}

    def pack(self, value: ir.Value, tail: tuple[int, ...], dtype: np.dtype) -> ir.Value:
        flat = self.emit.op("Reshape", [value, self.emit.const(np.array([-1, *tail]))])
        packed = self.emit.op("Gather", [flat, self.tokens.index], {"axis": 0})
        set_packed_type(packed, tail, dtype)
        return packed

    def restore(self, value: ir.Value, layout: tuple[tuple[int, ...], bool], dtype: np.dtype) -> ir.Value:
        """[T, ...] → [B, S, ...] (or [B·S, ...] for a flat value), zeros at the padded positions."""
        op, const = self.emit.op, self.emit.const
        tail, flat = layout
        padded = op("Concat", [value, const(np.zeros((1, *tail), dtype))], {"axis": 0})
        restored = op("Gather", [padded, self.tokens.inverse], {"axis": 0})
        return op("Reshape", [restored, const(np.array([-1, *tail]))]) if flat else restored

    def apply(self, plan: PaddingPlan) -> None:
        self.plan = plan
        self.dtypes = {v: np.asarray(self.layout.values[v.name]).dtype for v in plan.layouts}
        packs = {
            v: self.pack(v, plan.layouts[v][0], self.dtypes[v])
            for v in sorted(plan.seeds, key=lambda v: v.name or "")
        }
        for node in plan.packed_attention:
            old, new = node.outputs[0], packed_attention(self, node, packs)
            plan.layouts[new], self.dtypes[new] = plan.layouts.pop(old), self.dtypes.pop(old)
        self._restore_for_readers()
        self.rule_counts["attention-on-restored-layout"] += len(plan.restored_attention)
        for node in plan.region:
            if node not in plan.restored_attention and node not in plan.packed_attention:
                self._on_real_tokens(node, packs)
        padded_outputs = self._restore_outputs()
        for value, (tail, _) in plan.layouts.items():
            if value not in plan.seeds:
                set_packed_type(value, tail, self.dtypes[value])
        self.graph.extend(self.emit.nodes)
        self.graph.sort()
        record = {"mask": self.mask.name, "outputs": padded_outputs}
        self.model.metadata_props[PADDED_OUTPUTS_KEY] = json.dumps(record)
        self.rule_counts["gather-real-tokens"] += len(packs)
        self.rule_counts["restore-padding"] += len(self.restored)

    def _padded_form(self, value: ir.Value) -> ir.Value:
        """A packed value in the padded layout, restored once however many readers need it."""
        if value in self.plan.seeds:
            return value
        if value not in self.restored:
            self.restored[value] = self.restore(value, self.plan.layouts[value], self.dtypes[value])
        return self.restored[value]

    def _restore_for_readers(self) -> None:
        """Readers outside the region (and attention on the restored layout) get padded inputs;
        a Shape reader gets the padded shape without restoring anything."""
        plan = self.plan
        readers = plan.boundary_users | plan.restored_attention
        for node in [n for n in self.graph if n in readers]:  # graph order: the same names every run
            if node.op_type == "Shape" and node.inputs[0] not in plan.seeds:
                padded_shape(self, node, plan.layouts[node.inputs[0]])
                continue
            for i, value in enumerate(node.inputs):
                if value in plan.layouts:
                    node.replace_input_with(i, self._padded_form(value))

    def _on_real_tokens(self, node: ir.Node, packs: dict[ir.Value, ir.Value]) -> None:
        """Move a token-wise node onto packed inputs; the token axes are gone, so a normalized
        or reduced axis is counted from the end and a Reshape reshapes only the tail."""
        for i, value in enumerate(node.inputs):
            if value in packs:
                node.replace_input_with(i, packs[value])
        if node.op_type in LAST_AXIS_NORMS:
            node.attributes["axis"] = ir.AttrInt64("axis", -1)
        elif node.op_type in LAST_AXIS_REDUCTIONS and len(node.inputs) > 1 and node.inputs[1] is not None:
            node.replace_input_with(1, self.emit.const(np.array([-1])))
        elif node.op_type in LAST_AXIS_REDUCTIONS:
            node.attributes["axes"] = ir.AttrInt64s("axes", [-1])
        elif node.op_type == "Reshape":
            tail = self.plan.layouts[node.outputs[0]][0]
            node.replace_input_with(1, self.emit.const(np.array([-1, *tail])))
        self.rule_counts["per-token-on-real-tokens"] += 1

    def _restore_outputs(self) -> list[int]:
        """Graph outputs computed on real tokens go back to the padded layout, under their names;
        only these hold zeros at padding (any other change would fail verification)."""
        positions = []
        for position, value in enumerate(list(self.graph.outputs)):
            if value in self.plan.layouts and value not in self.plan.seeds:
                padded = self._padded_form(value)
                padded.name, value.name = value.name, f"{value.name}_real_tokens"
                self.graph.outputs[position] = padded
                positions.append(position)
        return positions


def padded_shape(r: PaddingRewriter, node: ir.Node, layout: tuple[tuple[int, ...], bool]) -> None:
    """Shape of a packed value's padded layout, from the mask's shape: nothing restored."""
    op, const = r.emit.op, r.emit.const
    tail, flat = layout
    rows = r.tokens.mask_shape
    if flat:
        rows = op("ReduceProd", [rows], {"keepdims": 1})
    shape = op("Concat", [rows, const(np.array(tail, np.int64))], {"axis": 0})
    start, end = node.attributes.get_int("start", 0), node.attributes.get_int("end")
    if start != 0 or end is not None:
        bounds = [const(np.array([start])), const(np.array([end if end is not None else 2**62]))]
        shape = op("Slice", [shape, *bounds])
    ir.convenience.replace_all_uses_with(node.outputs[0], shape, replace_graph_outputs=True)
    r.graph.remove(node, safe=True)


def packed_attention(r: PaddingRewriter, node: ir.Node, packs: dict[ir.Value, ir.Value]) -> ir.Value:
    """Attention / MultiHeadAttention on packed tokens, the padding given by the lengths;
    returns the value that now carries the output."""
    key = op_key(node)
    hidden, _, _, packed_op = ATTENTION[key]
    inputs = [packs.get(node.inputs[i], node.inputs[i]) for i in hidden]
    if key == f"{MS}.Attention":
        bias = node.inputs[2] if len(node.inputs) > 2 else None
        if bias is None:  # PackedAttention requires one
            width = r.layout.rows_of(node.outputs[0])[-1]
            sizes = node.attributes.get_ints("qkv_hidden_sizes") or [width] * 3
            dtype = np.asarray(r.layout.values[node.outputs[0].name]).dtype
            bias = r.emit.const(np.zeros(sum(sizes), dtype))
        inputs += [node.inputs[1], bias]
    else:
        inputs += [node.inputs[3] if len(node.inputs) > 3 else None]
    attributes = {a: node.attributes[a].value for a in PACKED_ATTRIBUTES[packed_op] if a in node.attributes}
    packed = ir.node(
        packed_op, [*inputs, *r.tokens.lengths()], attributes, domain=MS, name=f"{node.name}_packed"
    )
    r.emit.nodes.append(packed)
    old, new = node.outputs[0], packed.outputs[0]
    ir.convenience.replace_all_uses_with(old, new, replace_graph_outputs=True)
    new.name, old.name = old.name, f"{old.name}_padded"
    r.graph.remove(node, safe=True)
    r.rule_counts[f"packed-{packed_op}"] += 1
    return new


def set_packed_type(value: ir.Value, tail: tuple[int, ...], dtype: np.dtype) -> None:
    value.shape = ir.Shape(["txcompile_tokens", *tail])
    value.type = ir.TensorType(ir.DataType.from_numpy(dtype))
