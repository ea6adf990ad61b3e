"""Stage two of attention fusion: a lowering turns a site's reading into one fused op.

Each lowering is a rule: ``check`` says why it cannot take a site (the read's own reason
first), ``build`` emits the op with a :class:`GraphBuilder` anchored before the site's P·V
MatMul. :class:`Lowering` holds what all of them share, so each one is only its op.
"""

from __future__ import annotations

from typing import ClassVar

import onnx_ir as ir

from txcompile.graph.build import GraphBuilder
from txcompile.graph.nodes import MS_DOMAIN
from txcompile.passes.attention.bias import per_head_bias
from txcompile.passes.attention.read import AttentionState, Reading
from txcompile.passes.attention.sites import Site
from txcompile.passes.rules import Rewrite, Rule


class Lowering(Rule):
    """One fused op for a read site. Subclasses give ``name``, ``op``, ``refuse`` and ``build``."""

    op: ClassVar[str]
    note: ClassVar[str | None] = None  # said on a site when the flag asked for this op and it refused
    softcap: ClassVar[bool] = False  # whether the op caps the scores itself (its softcap attribute)

    def match(self, model: ir.Model, state: AttentionState) -> list[Site]:
        return [site for site in state.sites if site.reason is None]

    def site_name(self, site: Site) -> str:
        return site.name

    def check(self, site: Site, state: AttentionState) -> str | None:
        reading = state.reading(site)
        if reading is None:
            return site.reason
        if site.softcap and not self.softcap:
            return (
                f"soft-capped scores ({site.softcap:g}·tanh(s/{site.softcap:g})): {self.op} has no softcap; "
                "GroupQueryAttention and ONNX Attention do (--attention-op gqa / onnx)"
            )
        if site.guarded and per_head_bias(reading, state.shapes):
            return "a NaN guard below the Softmax over a per-head bias (fully masked rows unknown)"
        return self.refuse(reading, state)

    def refuse(self, reading: Reading, state: AttentionState) -> str | None:
        """Why this op cannot take the read site (None: it can)."""
        return None

    def rewrite(self, model: ir.Model, site: Site, state: AttentionState) -> Rewrite:
        reading = state.reading(site)
        model.opset_imports.setdefault(MS_DOMAIN, 1)
        b = GraphBuilder(model.graph, f"txcompile_attention_{reading.index}", anchor=site.pv)
        self.build(model, reading, state, b)
        return Rewrite(self.op, b.commit(), extra=reading.facts(), rule=self.name)

    def build(self, model: ir.Model, reading: Reading, state: AttentionState, b: GraphBuilder) -> None:
        raise NotImplementedError
