"""Remove padding: run an encoder's per-token work on the real tokens only.

An encoder fed an attention mask spends most of its time in per-token work — projections, MLP,
LayerNorm — and whatever it computes for a padding token is thrown away. This pass gathers the
real tokens once ([B, S, H] → [T, H], T = the mask's ones), runs every token-wise node on them,
and restores the padded layout only where a consumer needs it (graph outputs, pooling, shape
reads), with zeros at the padded positions. Attention is the one place tokens meet:

- target gpu: ``PackedAttention`` / ``PackedMultiHeadAttention`` read the packed tokens
  directly, with token offsets and cumulative lengths computed once from the mask (the
  padding-free idea of ByteTransformer, on ORT's CUDA kernels);
- otherwise (the CPU has no packed attention kernel), the attention op runs on the restored
  layout and its output is packed again, so only the per-token work is saved.

A site qualifies only when its additive bias, evaluated on the verification inputs, blocks every
padded key of every real query (the packed kernels also need it to add nothing else, since
they take the padding from the lengths). The graph's padded outputs hold zeros at padded
positions; the model records which (``txcompile.padded_outputs``) so verification compares real
tokens only. On by default for ``--target gpu`` where some attention site fits the packed
kernels (encoders); ``--remove-padding`` asks for it anywhere, the CPU included.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx_ir as ir

from txcompile.graph.nodes import op_key
from txcompile.graph.probe import probe_values
from txcompile.passes.attention.gqa import padding_input
from txcompile.passes.attention.padding_layout import ATTENTION, USABLE, TokenLayout
from txcompile.passes.attention.padding_plan import PaddingPlan
from txcompile.passes.attention.padding_rewrite import PaddingRewriter
from txcompile.passes.base import TxPass


@dataclasses.dataclass(frozen=True)
class RemovePaddingOptions:
    remove_padding: bool | None = None  # None: on for the gpu target's encoders


class RemovePadding(TxPass):
    name = "remove-padding"
    summary = "per-token work on real tokens only (outputs 0 at padding); packed attention on the GPU"
    Options = RemovePaddingOptions

    def enabled(self) -> bool:
        asked = self.options.remove_padding
        return asked if asked is not None else self.context.target == "gpu"

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        self.details = {}
        if not self.enabled():
            self.details["note"] = "off (--remove-padding turns it on for this target)"
            return ir.passes.PassResult(model, False)
        mask_name, reason = padding_input(self.context.feeds)
        keep = np.asarray(self.context.feeds[mask_name]) != 0 if mask_name else None
        if reason or keep is None:
            self.details["note"] = reason or "no 2-D attention-mask input"
        elif keep.all():
            self.details["note"] = f"the verification inputs do not pad {mask_name}: cannot check the masks"
        else:
            self._pack(model, mask_name, keep)
        return ir.passes.PassResult(model, bool(self.rule_counts))

    # -----------------------------------------------------------------------------------------

    def _pack(self, model: ir.Model, mask_name: str, keep: np.ndarray) -> None:
        graph = model.graph
        attention = [n for n in graph if op_key(n) in ATTENTION]
        if not attention:
            self.details["note"] = "no fused attention op"
            return
        values = [*graph.inputs, *(v for n in graph for v in n.outputs if v.name)]
        mask = next(v for v in graph.inputs if v.name == mask_name)
        layout = TokenLayout(graph, probe_values(model, values, self.context.feeds), keep, mask)
        self.verdicts = {n: layout.attention_verdict(n, keep) for n in attention}
        plan = PaddingPlan(layout, self.verdicts, packed_kernels=self.context.target == "gpu")
        plan.walk(graph, layout.seeds([n for n, verdict in self.verdicts.items() if verdict in USABLE]))
        if not any(op_key(n) in ("MatMul", "Gemm") for n in plan.region):
            self.details["note"] = "no per-token matrix product would run on real tokens only"
            return
        if self.options.remove_padding is None and not plan.packed_attention:
            # the gpu default is for encoders: a decoder's causal attention would swap layouts twice a layer
            self.details["note"] = (
                "no attention site fits the packed kernels (--remove-padding forces the rest)"
            )
            return
        sites = {n.name: self._site_status(n, plan) for n in attention}
        PaddingRewriter(model, mask, layout, self.rule_counts).apply(plan)
        self.details.update(
            mask=mask_name,
            real_tokens=f"{int(keep.sum())} of {keep.size} in the verification inputs",
            nodes_on_real_tokens=len(plan.region),
            attention=sites,
            padded_layout_for=sorted(f"{op_key(u)} {u.name}".strip() for u in plan.boundary_users),
        )

    def _site_status(self, node: ir.Node, plan: PaddingPlan) -> str:
        if node in plan.packed_attention:
            return "packed op"
        if node in plan.restored_attention:
            return "restored layout"
        verdict = self.verdicts[node]
        return "its inputs are not on real tokens" if verdict in USABLE else verdict
