"""Lowerings to the standard ONNX ``Attention`` (opset 23); the model's opset is raised for it.

``onnx-attention`` (``--attention-op onnx``) takes Q, K, V as [B, N, S|L, D] — the head-split
tensors the graph already has — and the mask as one additive bias. ``onnx-attention-bsh``, the
CPU's default for head-split K/V (where MultiHeadAttention would read [B, N, L, D]: a rotated,
repeated K, say), takes them as [B, S|L, hidden] with K/V at their own
head count (grouped-query attention without the graph's repeat): onnxruntime's CPU kernel for it
ran 20 % faster than MultiHeadAttention over the repeated K/V (Mistral's 16/8 heads, 128 tokens,
2 threads, at batch 1 and 8), and the repeat's copies go.
"""

from __future__ import annotations

import onnx_ir as ir

from txcompile.graph.build import GraphBuilder
from txcompile.passes.attention import gqa
from txcompile.passes.attention.bias import AttentionBias, zero_unattended_rows
from txcompile.passes.attention.lower_gqa import grouped_kv, kv_bsh
from txcompile.passes.attention.lowering import Lowering
from txcompile.passes.attention.output import attach_output, query_bsh
from txcompile.passes.attention.read import AttentionState, Reading

ONNX_ATTENTION_OPSET = 23


class OnnxAttention(Lowering):
    """ONNX Attention over the head-split Q, K (un-transposed) and V."""

    name = "onnx-attention"
    op = "Attention"
    softcap = True

    def build(self, model: ir.Model, reading: Reading, state: AttentionState, b: GraphBuilder) -> None:
        raise_opset(model)
        site = reading.site
        key = b.op("Transpose", site.key_t, perm=[0, 1, 3, 2])
        query_length = b.op("Shape", site.query, start=2, end=3)
        key_length = b.op("Shape", key, start=2, end=3)
        mask = AttentionBias().build(reading, state, b, query_length, key_length)
        inputs = [site.query, key, site.value] + ([mask] if mask is not None else [])
        capping = {"softcap": float(site.softcap)} if site.softcap else {}
        output = b.op("Attention", *inputs, scale=float(site.scale), **capping)
        output = zero_unattended_rows(reading, state, b, mask, output, split_heads=True)
        attach_output(reading, output, state.shapes, b, merged=False)


class OnnxAttentionBsh(Lowering):
    """CPU: ONNX Attention over [B, S, hidden] Q and [B, L, KV·D] K/V, without the head repeat."""

    name = "onnx-attention-bsh"
    op = "Attention"
    softcap = True

    def refuse(self, reading: Reading, state: AttentionState) -> str | None:
        reason = cpu_refusal(state)
        if reason is not None:
            return reason
        plan = grouped_kv(reading, state)
        if isinstance(plan, str):
            return plan
        if gqa.cached(plan[0]) is not None:
            return "K/V are a KV cache's Concat: MultiHeadAttention reads them as they are"
        return None

    def build(self, model: ir.Model, reading: Reading, state: AttentionState, b: GraphBuilder) -> None:
        raise_opset(model)
        key, value, kv_heads = grouped_kv(reading, state)
        query = query_bsh(reading, b, state.counts)
        key, value = kv_bsh(reading, state, b, key, value, kv_heads)
        query_length = b.op("Shape", query, start=1, end=2)
        key_length = b.op("Shape", key, start=1, end=2)
        mask = AttentionBias().build(reading, state, b, query_length, key_length)
        emit_bsh(reading, state, b, [query, key, value], mask, kv_heads)


def cpu_refusal(state: AttentionState) -> str | None:
    """Why the [B, S, hidden] ONNX Attention forms cannot be used here (None: they can)."""
    if state.target != "cpu":
        return "ONNX Attention is the faster form on the CPU only"
    return state.opset_problem


def emit_bsh(
    reading: Reading, state: AttentionState, b: GraphBuilder, qkv: list, mask, kv_heads: int
) -> None:
    """ONNX Attention over [B, S|L, hidden] Q, K, V (and the mask) in place of the site."""
    site = reading.site
    capping = {"softcap": float(site.softcap)} if site.softcap else {}
    attributes = {"q_num_heads": reading.layout.heads, "kv_num_heads": kv_heads, "scale": float(site.scale)}
    output = b.ops("Attention", qkv + ([mask] if mask is not None else []), {**attributes, **capping})[0]
    output = zero_unattended_rows(reading, state, b, mask, output)
    attach_output(reading, output, state.shapes, b, merged=True)


def raise_opset(model: ir.Model) -> None:
    if model.opset_imports.get("", 1) < ONNX_ATTENTION_OPSET:
        model.opset_imports[""] = ONNX_ATTENTION_OPSET
        model.graph.opset_imports[""] = ONNX_ATTENTION_OPSET
