"""Lowering to the standard ONNX ``Attention`` (opset 23, ``--attention-op onnx``).

It takes Q, K, V as [B, N, S|L, D] — the head-split tensors the graph already has — and the
mask as one additive bias; the model's opset is raised to 23 for it.
"""

from __future__ import annotations

import onnx_ir as ir

from txcompile.graph.build import GraphBuilder
from txcompile.passes.attention.bias import AttentionBias, zero_unattended_rows
from txcompile.passes.attention.lowering import Lowering
from txcompile.passes.attention.output import attach_output
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


def raise_opset(model: ir.Model) -> None:
    if model.opset_imports.get("", 1) < ONNX_ATTENTION_OPSET:
        model.opset_imports[""] = ONNX_ATTENTION_OPSET
        model.graph.opset_imports[""] = ONNX_ATTENTION_OPSET
