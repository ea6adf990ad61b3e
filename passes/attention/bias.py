"""The two bias rules every MultiHeadAttention-style lowering shares.

``fold-projection-bias``: Q, K, V = projection + bias become the projections and one packed
bias [3 × hidden] — the kernel adds it while it splits the heads, one pass fewer over each.
``attention-bias``: the site's masks and additive biases become one additive
``attention_bias`` [B|1, N|1, S, L], built once and shared by every layer reading the same mask.
Both are applied from inside a lowering (they change what the fused op reads), so they are
small named helpers with reasons, not rules a pass runs on their own.
"""

from __future__ import annotations

import collections

import numpy as np
import onnx_ir as ir

from txcompile.graph.build import GraphBuilder
from txcompile.graph.constants import constant_array
from txcompile.graph.probe import Shapes
from txcompile.passes.attention.read import AttentionState, Reading
from txcompile.passes.attention.sites import BiasTerm


class FoldProjectionBias:
    """Strip ``+ bias[hidden]`` off each projection; the fused op takes the biases packed."""

    name = "fold-projection-bias"

    def check(self, value: ir.Value, hidden: int, shapes: Shapes) -> str | None:
        """Why ``value``'s bias cannot fold (None: it can)."""
        return self._split(value, hidden, shapes)[1]

    def plan(self, inputs: list[ir.Value], hidden: int, shapes: Shapes):
        """(what feeds the op instead, bias parts) — the inputs themselves when nothing folds."""
        folded, parts = [], []
        for value in inputs:
            found, _ = self._split(value, hidden, shapes)
            folded.append(found[0] if found else value)
            parts.append(found[1] if found else np.zeros(hidden, np.float32))
        return folded, parts

    def apply(
        self,
        inputs: list[ir.Value],
        hidden: int,
        b: GraphBuilder,
        shapes: Shapes,
        counts: collections.Counter,
    ) -> tuple[list[ir.Value], ir.Value | None]:
        """(inputs with their biases stripped, the packed bias or None when none folds)."""
        folded, parts = self.plan(inputs, hidden, shapes)
        if all(f is v for f, v in zip(folded, inputs, strict=True)):
            return inputs, None
        counts[self.name] += 1
        return folded, b.const(np.concatenate(parts))

    @staticmethod
    def _split(value: ir.Value, hidden: int, shapes: Shapes):
        producer = value.producer()
        if producer is None or producer.op_type != "Add":
            return None, "not an Add of a bias"
        if len(value.uses()) != 1:
            return None, f"{value.name} has another consumer"
        for i in (0, 1):
            bias, other = producer.inputs[i], producer.inputs[1 - i]
            array = constant_array(bias)
            other_shape = shapes(other)
            same_shape = other_shape is not None and other_shape == shapes(value)
            if array is not None and tuple(array.shape) == (hidden,) and same_shape:
                return (other, array.astype(np.float32)), None
        return None, f"no constant [{hidden}] bias added to a same-shaped projection"


class AttentionBias:
    """Masks and additive biases as the one additive input the fused op takes."""

    name = "attention-bias"

    def check(self, reading: Reading) -> str | None:
        return None if reading.site.biases else "no mask or bias on the scores"

    def build(
        self, reading: Reading, state: AttentionState, b: GraphBuilder, query_length, key_length
    ) -> ir.Value | None:
        """One additive bias of shape [B|1, N|1, S, L] (MHA broadcasts only the first two axes)."""
        site, layout, shapes = reading.site, reading.layout, state.shapes
        if self.check(reading) is not None:
            return None
        term_shapes = [shapes(t.value) for t in site.biases]
        full = (layout.seq, layout.keys)
        try:
            broadcast = np.broadcast_shapes(*term_shapes) if None not in term_shapes else None
        except ValueError:
            broadcast = None
        expand = broadcast is None or len(broadcast) != 4 or tuple(broadcast[2:]) != full
        key = (tuple(t.signature() for t in site.biases), expand, full)
        if key in state.bias_cache:
            return state.bias_cache[key]
        total = bias_sum(site.biases, b)
        if expand:
            ones = b.const(np.array([1, 1], np.int64))
            target = b.op("Concat", ones, query_length, key_length, axis=0)
            total = b.op("Expand", total, target)
        state.counts[self.name] += 1
        state.bias_cache[key] = total
        return total


def zero_unattended_rows(
    reading: Reading,
    state: AttentionState,
    b: GraphBuilder,
    bias: ir.Value | None,
    output: ir.Value,
    split_heads: bool = False,
) -> ir.Value:
    """The NaN guard's effect on the fused output ([B, S, hidden], or [B, N, S, D] when
    ``split_heads``): a query row whose every key is masked (−∞) gives 0, where the fused op's
    softmax over all −∞ gives NaN. Left-padded prompts have such rows (a padding token sees no
    real token), and a NaN there would reach every later step through the cache. The rows are
    read off the bias once per bias; its head axis is 1 (the lowering checked)."""
    if not reading.site.guarded or bias is None:
        return output
    key = ("unattended", id(bias), split_heads)
    if key not in state.bias_cache:
        top = b.axes_op("ReduceMax", bias, [-1], state.opset, keepdims=1)
        rows = b.op("IsInf", top, detect_positive=0)  # [B|1, 1, S, 1]
        if not split_heads:
            rows = b.axes_op("Squeeze", rows, [1], state.opset)
        state.bias_cache[key] = rows
    return b.op("Where", state.bias_cache[key], b.const(np.array(0.0, np.float32)), output)


def per_head_bias(reading: Reading, shapes: Shapes) -> bool:
    """Whether the site's bias has more than one head (its axis 1), as far as the shapes say."""
    for term in reading.site.biases:
        shape = shapes(term.value)
        if shape is None or (len(shape) == 4 and shape[1] != 1):
            return True
    return False


def bias_sum(terms: list[BiasTerm], b: GraphBuilder) -> ir.Value | None:
    """The terms as one additive tensor: added values scaled, Where-fills as Where(mask, 0, fill)."""
    total = None
    for term in terms:
        if term.kind == "add":
            value = term.value
            if term.factor != 1.0:
                value = b.op("Mul", value, b.const(np.array(term.factor, np.float32)))
        else:
            fill = b.const(np.array(term.fill * term.factor, np.float32))
            zero = b.const(np.array(0.0, np.float32))
            pair = [zero, fill] if term.kind == "fill-false" else [fill, zero]
            value = b.op("Where", term.value, *pair)
        total = value if total is None else b.op("Add", total, value)
    return total
