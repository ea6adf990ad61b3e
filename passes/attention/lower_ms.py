"""Lowering to com.microsoft.MultiHeadAttention, the default op on CPU and CUDA.

Q is fed as [B, S, hidden]. K and V go in as [B, L, hidden] too when the graph splits them
into heads with Reshape+Transpose (``mha-bsh``; their projection biases then fold into MHA's
packed bias), else as [B, N, L, D] (``mha-bnsh-kv``) — e.g. LLaMA's rotated, repeated K/V:
grouped-query attention is fused with the repeated KV the graph already builds.
"""

from __future__ import annotations

import onnx_ir as ir

from txcompile.graph.build import GraphBuilder
from txcompile.graph.nodes import MS_DOMAIN
from txcompile.passes.attention.bias import AttentionBias, FoldProjectionBias, zero_unattended_rows
from txcompile.passes.attention.lowering import Lowering
from txcompile.passes.attention.output import attach_output, query_bsh
from txcompile.passes.attention.read import AttentionState, Reading

MHA = f"{MS_DOMAIN}.MultiHeadAttention"


def emit_contrib(
    reading: Reading,
    state: AttentionState,
    b: GraphBuilder,
    inputs: list,
    op_type: str = "MultiHeadAttention",
) -> None:
    """``op_type`` (a com.microsoft attention op) over ``inputs``, trailing empty ones dropped, in place
    of the site."""
    while inputs and inputs[-1] is None:
        inputs.pop()
    attributes = {"num_heads": reading.layout.heads, "scale": float(reading.site.scale)}
    output = b.ops(op_type, inputs, attributes, domain=MS_DOMAIN)[0]
    bias = inputs[5] if len(inputs) > 5 else None
    output = zero_unattended_rows(reading, state, b, bias, output)
    attach_output(reading, output, state.shapes, b, merged=True)


class MultiHeadAttentionBsh(Lowering):
    """Q, K, V all as [B, S|L, hidden]: the heads are split inside the kernel."""

    name = "mha-bsh"
    op = MHA

    def refuse(self, reading: Reading, state: AttentionState) -> str | None:
        if reading.key_bsh is None or reading.value_bsh is None:
            return "K/V are not [B, L, hidden] tensors split into heads"
        return None

    def build(self, model: ir.Model, reading: Reading, state: AttentionState, b: GraphBuilder) -> None:
        query = query_bsh(reading, b, state.counts)
        inputs = [query, reading.key_bsh, reading.value_bsh]
        fold = FoldProjectionBias()
        (query, key, value), packed_bias = fold.apply(
            inputs, reading.layout.hidden, b, state.shapes, state.counts
        )
        key_length = b.op("Shape", key, start=1, end=2)
        query_length = b.op("Shape", query, start=1, end=2)
        bias = AttentionBias().build(reading, state, b, query_length, key_length)
        emit_contrib(reading, state, b, [query, key, value, packed_bias, None, bias])


class MultiHeadAttentionBnsh(Lowering):
    """K and V as [B, N, L, D] (the fallback: every read site can take it)."""

    name = "mha-bnsh-kv"
    op = MHA

    def build(self, model: ir.Model, reading: Reading, state: AttentionState, b: GraphBuilder) -> None:
        query = query_bsh(reading, b, state.counts)
        key = reading.key_bnsh
        if key is None:
            key = b.op("Transpose", reading.site.key_t, perm=[0, 1, 3, 2])
        key_length = b.op("Shape", key, start=2, end=3)
        query_length = b.op("Shape", query, start=1, end=2)
        bias = AttentionBias().build(reading, state, b, query_length, key_length)
        emit_contrib(reading, state, b, [query, key, reading.site.value, None, None, bias])
