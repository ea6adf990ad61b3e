"""Fuse the BERT-family embedding block into ``com.microsoft.EmbedLayerNormalization``.

The block sums two or three embedding lookups (words, positions, token types) and normalizes:
LayerNorm(Gather(W, ids) + Gather(P, positions) [+ Gather(T, types)]); after ``fuse-norms`` it
is a LayerNormalization or a SkipLayerNormalization over those sums (read by embed_sites.py).
It becomes one node that gathers, adds and normalizes in one pass over the hidden states.

Every lookup keeps the indices the graph computes (cast to int32, which the op takes), so
positions computed from a buffer, RoBERTa's padding-aware positions and token types built from
a buffer all stay exactly what they were. Run after ``fuse-norms``.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx_ir as ir

from txcompile.graph.build import GraphBuilder
from txcompile.graph.nodes import MS_DOMAIN, RULE_KEY
from txcompile.graph.probe import Shapes, probe_shapes
from txcompile.passes.attention.embed_sites import Site, assign_roles, match
from txcompile.passes.rules import Rewrite, Rule, RulePass, SiteRecord

SHAPE_READERS = "embed-shape-readers"  # the tag of the Shape readers rebuilt from the indices


@dataclasses.dataclass
class EmbedState:
    sites: list[Site]
    shapes: Shapes
    fused: int = 0  # numbers the builders' prefixes


class EmbedLayerNormRule(Rule):
    """LayerNorm(W[ids] + P[positions] [+ T[types]]) → EmbedLayerNormalization."""

    name = "embed-layer-norm"

    def match(self, model: ir.Model, state: EmbedState) -> list[Site]:
        return state.sites

    def site_name(self, site: Site) -> str:
        return site.norm.name or site.norm.outputs[0].name

    def check(self, site: Site, state: EmbedState) -> str | None:
        if site.reason is None:
            site.roles = assign_roles(site, state.shapes)
            if site.roles is None:
                site.reason = "the lookups' index shapes do not fit (ids [B, S], positions [1|B, S])"
        return site.reason

    def rewrite(self, model: ir.Model, site: Site, state: EmbedState) -> Rewrite:
        prefix = f"txcompile_embed_{state.fused}"
        state.fused += 1
        build = GraphBuilder(model.graph, prefix, anchor=site.norm)

        def int32(value: ir.Value) -> ir.Value:
            if value.dtype == ir.DataType.INT32:
                return value
            return build.op("Cast", value, to=ir.DataType.INT32)

        roles = site.roles
        word, position, segment = roles["word"], roles["position"], roles.get("segment")
        positions = position.ids
        if position.unsqueeze is not None or len(state.shapes(positions)) == 1:  # [S]: the op takes [1, S]
            positions = build.op("Unsqueeze", positions, build.const(np.array([0], np.int64)))
        gamma, beta = site.norm.inputs[2], site.norm.inputs[3] if len(site.norm.inputs) > 3 else None
        if site.norm.op_type == "LayerNormalization":
            gamma, beta = site.norm.inputs[1], site.norm.inputs[2] if len(site.norm.inputs) > 2 else None
        if beta is None:
            beta = build.const(np.zeros(word.table.shape[1], np.float32))
        inputs = [
            int32(word.ids),
            int32(segment.ids) if segment else None,
            word.gather.inputs[0],
            position.gather.inputs[0],
            segment.gather.inputs[0] if segment else None,
            gamma,
            beta,
            None,  # mask: the attention fusion builds its own bias from the attention mask
            int32(positions),
        ]
        epsilon = site.norm.attributes.get_float("epsilon", 1e-5)
        output, _, total = build.ops(
            "EmbedLayerNormalization", inputs, {"epsilon": epsilon}, domain=MS_DOMAIN, outputs=3
        )
        nodes = build.commit()
        hidden = word.table.shape[1]
        readers = [(lookup.gather.outputs[0], lookup.ids) for lookup in site.lookups]
        readers += [(site.total, word.ids)] if site.total is not None else []
        for k, (value, ids) in enumerate(readers):
            for node in _reshape_readers(model.graph, f"{prefix}/shape{k}", value, ids, hidden):
                node.metadata_props[RULE_KEY] = SHAPE_READERS
        ir.convenience.replace_all_uses_with(site.norm.outputs[0], output)
        if site.total is not None:
            for user, index in list(site.total.uses()):
                if user is not site.norm:
                    user.replace_input_with(index, total)
        return Rewrite("EmbedLayerNormalization", nodes)


def _reshape_readers(
    graph: ir.Graph, prefix: str, value: ir.Value, ids: ir.Value, hidden: int
) -> list[ir.Node]:
    """Shape(value) = Shape(ids) + [hidden] for an embedding (sum) gathered by ``ids``: rewire
    Shape readers to the indices, so they neither keep the unfused lookups alive nor read the
    fused node's output before it exists."""
    created = []
    for k, (user, _) in enumerate(list(value.uses())):
        if user.op_type != "Shape":
            continue
        build = GraphBuilder(graph, f"{prefix}_{k}", anchor=user)
        result = build.op("Concat", build.op("Shape", ids), build.const(np.array([hidden], np.int64)), axis=0)
        start, end = user.attributes.get_int("start", 0), user.attributes.get_int("end", None)
        if start != 0 or end is not None:
            bounds = [np.array([start], np.int64), np.array([end if end is not None else 2**62], np.int64)]
            result = build.op("Slice", result, *(build.const(bound) for bound in bounds))
        created += build.commit()
        ir.convenience.replace_all_uses_with(user.outputs[0], result)
    return created


class FuseEmbedLayerNorm(RulePass):
    name = "fuse-embed-layernorm"
    summary = "LayerNorm(sum of 2–3 embedding lookups) → com.microsoft.EmbedLayerNormalization (BERT family)"
    rules = (EmbedLayerNormRule,)

    def prepare(self, model: ir.Model) -> EmbedState:
        sites = [site for node in model.graph if (site := match(node)) is not None]
        values = [lookup.ids for site in sites for lookup in site.lookups]
        return EmbedState(sites, Shapes(probe_shapes(model, values, self.context.feeds) if sites else {}))

    def finish(self, model: ir.Model, state: EmbedState, records: list[SiteRecord]) -> None:
        if state.fused:
            model.opset_imports.setdefault(MS_DOMAIN, 1)
            super().finish(model, state, records)
            model.graph.sort()  # readers of the embedding sum may sit before the norm
