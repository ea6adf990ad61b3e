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
from txcompile.passes.attention.bias import AttentionBias, zero_unattended_rows
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
    return grouped_kv(reading, state)


def grouped_kv(reading: Reading, state: AttentionState):
    """(K, V with their own heads, KV heads) behind the graph's head repeat, else why not."""
    site, layout = reading.site, reading.layout
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


def kv_bsh(reading: Reading, state: AttentionState, b: GraphBuilder, key, value, kv_heads: int):
    """K and V as [B, L, KV·D]: the graph's own tensors before their head split, else merged here."""
    layout, shapes = reading.layout, state.shapes
    kv_layout = dataclasses.replace(layout, heads=kv_heads)
    return tuple(
        v
        if len(shapes(v) or ()) == 3
        else merged_heads(v, (0, 2, 1, 3), layout.keys, kv_layout, shapes) or bsh(v, kv_layout.hidden, b)
        for v in (key, value)
    )


class GroupQueryAttention(Lowering):
    """K/V at their own head count; causal ∧ padding as lengths, checked on the verification inputs."""

    name = "gqa"
    op = f"{MS_DOMAIN}.GroupQueryAttention"
    note = "not GroupQueryAttention"
    softcap = True

    def refuse(self, reading: Reading, state: AttentionState) -> str | None:
        if _cache_plan(reading, state) is not None:
            return None
        plan = gqa_plan(reading, state)
        return plan if isinstance(plan, str) else None

    def rewrite(self, model: ir.Model, site, state: AttentionState):
        """The record says which bias a cached site took: the padding alone, or the exporter's
        mask and why."""
        reading = state.reading(site)
        cached = _cache_plan(reading, state) is not None
        reason = CachePaddingBias().check(reading, state) if cached else None
        rewrite = super().rewrite(model, site, state)
        if cached:
            rewrite.extra["bias"] = "padding only" if reason is None else f"the exporter's mask: {reason}"
        return rewrite

    def build(self, model: ir.Model, reading: Reading, state: AttentionState, b: GraphBuilder) -> None:
        if _cache_plan(reading, state) is not None:
            _build_with_cache(model, reading, state, b)
            return
        key, value, kv_heads = gqa_plan(reading, state)
        site, layout, shapes = reading.site, reading.layout, state.shapes
        query = reading.query_bsh if reading.query_bsh is not None else bsh(site.query, layout.hidden, b)
        key, value = kv_bsh(reading, state, b, key, value, kv_heads)
        seqlens, total = _lengths(model, key, state, b)
        attributes = _attributes(site, layout.heads, kv_heads)
        inputs = [query, key, value, None, None, seqlens, total]
        output = b.ops("GroupQueryAttention", inputs, attributes, domain=MS_DOMAIN, outputs=3)[0]
        attach_output(reading, output, shapes, b, merged=True)


def _cache_plan(reading: Reading, state: AttentionState):
    """((past K, new K), (past V, new V), KV heads) when the site attends over a KV cache —
    K and V are Concat(past input, new) before any head repeat — and its mask is causal."""
    site, layout = reading.site, reading.layout
    key = reading.key_bnsh
    if key is None:
        return None
    dims = (layout.batch, layout.heads, layout.keys, layout.head_dim)
    key, kv_heads = gqa.unrepeated(key, *dims, state.shapes)
    value, value_heads = gqa.unrepeated(site.value, *dims, state.shapes)
    keys, values = gqa.cached(key), gqa.cached(value)
    if keys is None or values is None or kv_heads != value_heads:
        return None
    if gqa.causal_reason(site, layout.seq, layout.keys, state.mask_values) is not None:
        return None
    return (key, *keys), (value, *values), kv_heads


def _build_with_cache(model: ir.Model, reading: Reading, state: AttentionState, b: GraphBuilder) -> None:
    """GroupQueryAttention appending the new K/V to the past itself: its present outputs take
    the place (and the names) of the graph's Concat. Every row counts all total_seq positions
    (seqlens_k = total − 1, left padding included) and the site's own mask goes in as the
    attention bias, so padding anywhere and sliding windows stay exact; when the present is bound
    to the past's buffer (a generate loop's preallocated cache) the op writes into it in place."""
    (present_key, past_key, new_key), (present_value, past_value, new_value), kv_heads = _cache_plan(
        reading, state
    )
    site, layout, shapes = reading.site, reading.layout, state.shapes
    kv_layout = dataclasses.replace(layout, heads=kv_heads)
    query = reading.query_bsh if reading.query_bsh is not None else bsh(site.query, layout.hidden, b)
    new_key, new_value = (
        merged_heads(v, (0, 2, 1, 3), layout.seq, kv_layout, shapes) or bsh(v, kv_layout.hidden, b)
        for v in (new_key, new_value)
    )
    query_length = b.op("Shape", query, start=1, end=2)
    past_length = b.op("Shape", past_key, start=2, end=3)
    key_length = b.op("Add", past_length, query_length)
    padding = CachePaddingBias()
    padding_only = padding.check(reading, state) is None
    if padding_only:
        bias = padding.build(model, state, b, query_length)
    else:
        bias = AttentionBias().build(reading, state, b, query_length, key_length)
    seqlens, total = _cache_lengths(state, b, bias, query, key_length)
    inputs = [query, new_key, new_value, past_key, past_value, seqlens, total]
    inputs += [None, None, None, bias]
    attributes = _attributes(site, layout.heads, kv_heads)
    output, key_out, value_out = b.ops("GroupQueryAttention", inputs, attributes, domain=MS_DOMAIN, outputs=3)
    if not padding_only:  # a finite blocked value leaves no NaN for a query that sees no key
        output = zero_unattended_rows(reading, state, b, bias, output)
    attach_output(reading, output, state.shapes, b, merged=True)
    for old, new in ((present_key, key_out), (present_value, value_out)):
        name = old.name
        old.replace_all_uses_with(new, replace_graph_outputs=True)
        old.name, new.name = f"{name}_concat", name


class CachePaddingBias:
    """GroupQueryAttention over a cache applies the causal mask itself, so when the site's mask
    is just causal ∧ key-not-padding its bias can be the padding alone, built from the mask
    input in six small nodes instead of the exporter's few dozen, with a finite blocked value
    (then no query gets NaN, and the NaN guard's Where per layer goes too). Whether the mask is
    that is read off the verification inputs — except a sliding window wider than they are
    long, which is why the decoder's generation metadata must say it has none."""

    name = "cache-padding-bias"

    def check(self, reading: Reading, state: AttentionState) -> str | None:
        if state.target != "cpu":
            return "the CPU only (a float16 bias would turn the blocked value into −∞)"
        if state.sliding_window is None:
            return "the model's sliding window is not recorded (txcompile.generation metadata)"
        if state.sliding_window:
            return f"a {state.sliding_window}-token sliding window: the exporter's mask keeps it"
        if state.padding is None:
            return state.padding_reason or "no 2-D attention-mask input"
        layout = reading.layout
        return gqa.cache_padding_reason(
            reading.site, layout.seq, layout.keys, state.mask_values, state.feeds, state.padding
        )

    def build(self, model: ir.Model, state: AttentionState, b: GraphBuilder, query_length) -> ir.Value:
        """[B, 1, S, total]: the float32 minimum where the mask is 0, else 0; one for all layers."""
        key = (self.name, state.padding)
        if key in state.bias_cache:
            return state.bias_cache[key]
        mask = _mask_input(model, state)
        zero = b.const(np.array(0, mask.dtype.numpy()))
        blocked = b.const(np.array(np.finfo(np.float32).min, np.float32))
        rows = b.op("Where", b.op("Equal", mask, zero), blocked, b.const(np.array(0, np.float32)))
        rows = b.axes_op("Unsqueeze", rows, [1, 2], state.opset)
        ones, one = b.const(np.array([1, 1], np.int64)), b.const(np.array([1], np.int64))
        bias = b.op("Expand", rows, b.op("Concat", ones, query_length, one, axis=0))
        state.counts[self.name] += 1
        state.bias_cache[key] = bias
        return bias


def _mask_input(model: ir.Model, state: AttentionState) -> ir.Value:
    """The 2-D attention-mask graph input the lengths and the padding bias are read from."""
    return next(v for v in model.graph.inputs if v.name == state.padding)


def _attributes(site, heads: int, kv_heads: int) -> dict:
    attributes = {"num_heads": heads, "kv_num_heads": kv_heads, "scale": float(site.scale)}
    if site.softcap:
        attributes["softcap"] = float(site.softcap)
    return attributes


def _cache_lengths(state: AttentionState, b: GraphBuilder, bias, query: ir.Value, key_length: ir.Value):
    """(seqlens_k [B] = total − 1 for every row, total_sequence_length) as int32. Sites sharing
    one bias share them: the bias is [B|1, 1, S, total] for all of them, so its first site's
    lengths are theirs too."""
    key = ("cache-lengths", bias)
    if bias is not None and key in state.lengths_cache:
        return state.lengths_cache[key]
    total = b.op("Cast", b.op("Squeeze", key_length), to=ir.DataType.INT32)
    batch = b.op("Shape", query, start=0, end=1)
    seqlens = b.op("Expand", b.op("Sub", total, b.const(np.array(1, np.int32))), batch)
    if bias is not None:
        state.lengths_cache[key] = (seqlens, total)
    return seqlens, total


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
    mask = _mask_input(model, state)
    axis = b.const(np.array([1], np.int64))
    valid = b.op("ReduceSum", b.op("Cast", mask, to=int32), axis, keepdims=0)
    seqlens = b.op("Sub", valid, one)
    length = b.op("Squeeze", b.op("Shape", mask, start=1, end=2))
    pair = (seqlens, b.op("Cast", length, to=int32))
    state.lengths_cache[state.padding] = pair
    return pair
