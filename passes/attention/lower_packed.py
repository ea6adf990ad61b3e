"""Lowerings for Q, K and V that project one input: one GEMM instead of three.

``attention-packed-qkv``: com.microsoft.Attention takes X and [Wq | Wk | Wv] and does the
three GEMMs as one. ``mha-qkv-matmul``, for int8: the GEMMs as one plain MatMul, which the
quantize pass makes integer (inside com.microsoft.Attention they would stay fp32), split
into MultiHeadAttention. Which of the two: the precision the target runs at.
``onnx-attention-qkv-matmul``, for int8 on the CPU: the same MatMul, split into ONNX Attention
(opset 23) over [B, S, hidden] tensors, whose onnxruntime CPU kernel is the faster one
(all-MiniLM-L6-v2 int8, 2 threads: 8–9 % faster end to end than with MultiHeadAttention, at
one sentence and at batches of 32; at fp32 com.microsoft.Attention and it are even).
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from txcompile.graph.build import GraphBuilder
from txcompile.graph.nodes import MS_DOMAIN
from txcompile.passes.attention.bias import AttentionBias, FoldProjectionBias
from txcompile.passes.attention.lower_ms import MHA, emit_contrib
from txcompile.passes.attention.lower_onnx import cpu_refusal, emit_bsh, raise_opset
from txcompile.passes.attention.lowering import Lowering
from txcompile.passes.attention.packing import Packed, packed_projection
from txcompile.passes.attention.read import AttentionState, Reading
from txcompile.passes.targets.precision import requested_precision


def _packed(reading: Reading, state: AttentionState) -> tuple[Packed | None, str | None]:
    """(the packed projection, None) or (None, why Q, K and V do not project one input)."""
    if reading.key_bsh is None or reading.value_bsh is None:
        return None, "K/V are not [B, L, hidden] tensors split into heads"
    if reading.query_bsh is None:
        return None, "Q is not a [B, S, hidden] tensor split into heads"
    inputs = [reading.query_bsh, reading.key_bsh, reading.value_bsh]
    folded, _ = FoldProjectionBias().plan(inputs, reading.layout.hidden, state.shapes)
    packed = packed_projection(reading.site, *folded, state.shapes)
    if packed is None:
        return None, "Q, K and V are not projections of one input read only by this site"
    return packed, None


class _PackedLowering(Lowering):
    int8: bool

    def refuse(self, reading: Reading, state: AttentionState) -> str | None:
        _, reason = _packed(reading, state)
        if reason is not None:
            return reason
        if (requested_precision(state.precision, state.target) == "int8") != self.int8:
            return "int8 keeps the packed GEMM a MatMul" if not self.int8 else "not int8"
        return None

    def build(self, model: ir.Model, reading: Reading, state: AttentionState, b: GraphBuilder) -> None:
        inputs = [reading.query_bsh, reading.key_bsh, reading.value_bsh]
        fold = FoldProjectionBias()
        folded, packed_bias = fold.apply(inputs, reading.layout.hidden, b, state.shapes, state.counts)
        packed = packed_projection(reading.site, *folded, state.shapes)
        length = b.op("Shape", packed[0], start=1, end=2)
        bias = AttentionBias().build(reading, state, b, length, length)
        self.emit(reading, state, b, packed, packed_bias, bias)

    def emit(self, reading, state, b: GraphBuilder, packed: Packed, packed_bias, bias) -> None:
        raise NotImplementedError


class PackedAttention(_PackedLowering):
    """com.microsoft.Attention: X, the packed weights, the packed bias and the mask."""

    name = "attention-packed-qkv"
    op = f"{MS_DOMAIN}.Attention"
    int8 = False

    def emit(self, reading, state, b: GraphBuilder, packed: Packed, packed_bias, bias) -> None:
        source, weights, split_bias = packed
        if split_bias is not None:
            packed_bias = b.const(split_bias)
        elif packed_bias is None:
            packed_bias = b.const(np.zeros(weights.shape[1], np.float32))
        emit_contrib(
            reading, state, b, [source, b.const(weights), packed_bias, None, None, bias], "Attention"
        )


class PackedMatMul(_PackedLowering):
    """int8: MatMul(X, [Wq | Wk | Wv]) split in three, into MultiHeadAttention."""

    name = "mha-qkv-matmul"
    op = MHA
    int8 = True

    def emit(self, reading, state, b: GraphBuilder, packed: Packed, packed_bias, bias) -> None:
        projected, packed_bias = _projection(b, packed, packed_bias)
        parts = b.ops("Split", [projected], {"axis": -1, "num_outputs": 3}, outputs=3)
        emit_contrib(reading, state, b, [*parts, packed_bias, None, bias])


class OnnxAttentionMatMul(_PackedLowering):
    """int8 on the CPU: MatMul(X, [Wq | Wk | Wv]) (+ bias) split in three, into ONNX Attention."""

    name = "onnx-attention-qkv-matmul"
    op = "Attention"
    int8 = True
    softcap = True

    def refuse(self, reading: Reading, state: AttentionState) -> str | None:
        return cpu_refusal(state) or super().refuse(reading, state)

    def build(self, model: ir.Model, reading: Reading, state: AttentionState, b: GraphBuilder) -> None:
        raise_opset(model)
        super().build(model, reading, state, b)

    def emit(self, reading, state, b: GraphBuilder, packed: Packed, packed_bias, bias) -> None:
        projected, packed_bias = _projection(b, packed, packed_bias)
        if packed_bias is not None:
            projected = b.op("Add", projected, packed_bias)
        parts = b.ops("Split", [projected], {"axis": -1, "num_outputs": 3}, outputs=3)
        emit_bsh(reading, state, b, list(parts), bias, reading.layout.heads)


def _projection(b: GraphBuilder, packed: Packed, packed_bias):
    """(MatMul(X, [Wq | Wk | Wv]), the packed bias): int8's one product for Q, K and V."""
    source, weights, split_bias = packed
    if split_bias is not None:
        packed_bias = b.const(split_bias)
    return b.op("MatMul", source, b.const(weights)), packed_bias
