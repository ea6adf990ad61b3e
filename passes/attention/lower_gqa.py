"""Lowering to com.microsoft.GroupQueryAttention (``--attention-op gqa``).

Q [B, S, N·D], K/V [B, L, KV·D] without the repetition, the causal mask and the padding as
per-row lengths: the op the CUDA EP runs with flash / memory-efficient kernels. When a site
cannot be GroupQueryAttention (:mod:`.gqa` says why), it falls back to the MultiHeadAttention
forms and the site's record notes the reason.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx_ir as ir

from txcompile.graph.build import GraphBuilder
from txcompile.graph.nodes import MS_DOMAIN
from txcompile.passes.attention import gqa
from txcompile.passes.attention.lowering import Lowering
from txcompile.passes.attention.output import attach_output, bsh
from txcompile.passes.attention.read import AttentionState, Reading, merged_heads


def gqa_plan(reading: Reading, state: AttentionState):
    """(K, V with their own heads, KV heads) when the site may be GroupQueryAttention, else why not."""
    if state.padding_reason:
        return state.padding_reason
    site, layout = reading.site, reading.layout
    reason = gqa.causal_padding_reason(
        site, layout.seq, layout.keys, state.mask_values, state.feeds, state.padding
    )
    if reason:
        return reason
    if reading.key_bsh is not None and reading.key_bnsh is None:  # Kᵀ split from [B, L, hidden]
        return reading.key_bsh, site.value, layout.heads
    if reading.key_bnsh is None:
        return "K is neither [B, L, hidden] split into heads nor a transposed [B, N, L, D] tensor"
    dims = (layout.batch, layout.heads, layout.keys, layout.head_dim)
    key, kv_heads = gqa.unrepeated(reading.key_bnsh, *dims, state.shapes)
    value, value_heads = gqa.unrepeated(site.value, *dims, state.shapes)
    if kv_heads != value_heads:
        return f"K has {kv_heads} heads before repetition, V {value_heads}"
    return key, value, kv_heads


class GroupQueryAttention(Lowering):
    """K/V at their own head count; causal ∧ padding as lengths, checked on the verification inputs."""

    name = "gqa"
    op = f"{MS_DOMAIN}.GroupQueryAttention"
    note = "not GroupQueryAttention"

    def refuse(self, reading: Reading, state: AttentionState) -> str | None:
        plan = gqa_plan(reading, state)
        return plan if isinstance(plan, str) else None

    def build(self, model: ir.Model, reading: Reading, state: AttentionState, b: GraphBuilder) -> None:
        key, value, kv_heads = gqa_plan(reading, state)
        site, layout, shapes = reading.site, reading.layout, state.shapes
        kv_layout = dataclasses.replace(layout, heads=kv_heads)
        query = reading.query_bsh if reading.query_bsh is not None else bsh(site.query, layout.hidden, b)
        key = key if len(shapes(key) or ()) == 3 else bsh(key, kv_layout.hidden, b)
        value = merged_heads(value, (0, 2, 1, 3), layout.keys, kv_layout, shapes) or bsh(
            value, kv_layout.hidden, b
        )
        seqlens, total = _lengths(model, key, state, b)
        attributes = {"num_heads": layout.heads, "kv_num_heads": kv_heads, "scale": float(site.scale)}
        inputs = [query, key, value, None, None, seqlens, total]
        output = b.ops("GroupQueryAttention", inputs, attributes, domain=MS_DOMAIN, outputs=3)[0]
        attach_output(reading, output, shapes, b, merged=True)


def _lengths(model: ir.Model, key: ir.Value, state: AttentionState, b: GraphBuilder):
    """(seqlens_k [B] = valid keys − 1, total_sequence_length) as int32, shared by the layers
    when they come from the attention-mask input."""
    int32 = ir.DataType.INT32
    if state.padding in state.lengths_cache:
        return state.lengths_cache[state.padding]
    one = b.const(np.array(1, np.int32))
    if state.padding is None:
        total = b.op("Cast", b.op("Squeeze", b.op("Shape", key, start=1, end=2)), to=int32)
        batch = b.op("Shape", key, start=0, end=1)
        return b.op("Expand", b.op("Sub", total, one), batch), total
    mask = next(v for v in model.graph.inputs if v.name == state.padding)
    axis = b.const(np.array([1], np.int64))
    valid = b.op("ReduceSum", b.op("Cast", mask, to=int32), axis, keepdims=0)
    seqlens = b.op("Sub", valid, one)
    length = b.op("Squeeze", b.op("Shape", mask, start=1, end=2))
    pair = (seqlens, b.op("Cast", length, to=int32))
    state.lengths_cache[state.padding] = pair
    return pair
