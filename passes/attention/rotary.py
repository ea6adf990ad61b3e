"""Fuse rotary position embeddings (RoPE) into ``com.microsoft.RotaryEmbedding``.

Exporters write RoPE as x·cos + rotate_half(x)·sin (read by rotary_sites.py). Each site — one
for Q, one for K, per layer — becomes one RotaryEmbedding node that rotates x in place of
five elementwise ops.

The graph's own cos/sin stay: their first half, one row per position, is the op's cache, and
the position ids are the offset 0. That keeps the fused graph valid at every sequence length
(no cache to size). Where cos/sin differ per batch row — a decoder with a cache takes position
ids, which count each left-padded row's own tokens from its past — the cache is their first
half flattened to one row per (batch row, position), and the position ids index it
(b·seq + s): exact for any past length, still with no table to size. Partial rotary rotates
the sliced part; the interleaved form (GPT-J) is rotary_interleaved.py's rule.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx_ir as ir

from txcompile.graph.build import GraphBuilder
from txcompile.graph.nodes import MS_DOMAIN
from txcompile.graph.probe import Shapes, probe_shapes, probe_values
from txcompile.passes.attention import rotary_interleaved
from txcompile.passes.attention.read import Layout, merged_heads, perm
from txcompile.passes.attention.rotary_sites import Site, check, folded_tables, match, shared_by_rows
from txcompile.passes.rules import Rewrite, Rule, RulePass, SiteRecord


@dataclasses.dataclass
class RotaryState:
    """The sites found once, their probed shapes, and the cos/sin caches shared between sites."""

    sites: list[Site]
    shapes: Shapes
    caches: dict[tuple[str, str], tuple[ir.Value, ir.Value, ir.Value]] = dataclasses.field(
        default_factory=dict
    )
    tables: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)  # folded cos/sin
    interleaved: list[rotary_interleaved.Site] = dataclasses.field(default_factory=list)
    fused: int = 0  # numbers the builders' prefixes


class RotaryRule(Rule):
    """x·cos + rotate_half(x)·sin → RotaryEmbedding(x, 0, cos[..., :h], sin[..., :h])."""

    name = "rotary-embedding"

    def match(self, model: ir.Model, state: RotaryState) -> list[Site]:
        return state.sites

    def site_name(self, site: Site) -> str:
        return site.add.name or site.add.outputs[0].name

    def check(self, site: Site, state: RotaryState) -> str | None:
        site.reason = site.reason or check(site, state.shapes, state.tables)
        return site.reason

    def rewrite(self, model: ir.Model, site: Site, state: RotaryState) -> Rewrite:
        x_shape = state.shapes(site.x)
        half = x_shape[-1] // 2
        build = GraphBuilder(model.graph, f"txcompile_rotary_{state.fused}", anchor=site.add)
        state.fused += 1
        key = (site.cos.name, site.sin.name)
        if key not in state.caches:
            zero, end = build.const(np.array([0], np.int64)), build.const(np.array([half], np.int64))
            last, rows = build.const(np.array([-1], np.int64)), build.const(np.array([-1, half], np.int64))
            cos, sin = (
                build.op("Reshape", build.op("Slice", value, zero, end, last), rows)
                for value in (site.cos, site.sin)
            )
            if shared_by_rows(site, state.shapes):
                positions = build.const(np.array([0], np.int64))
            else:
                positions = _row_positions(build, site.cos, site.x)
            state.caches[key] = (cos, sin, positions)
        cos_cache, sin_cache, offset = state.caches[key]
        heads, head_dim = x_shape[1], x_shape[-1]
        merged = head_split_source(site.x, state.shapes)
        rotated = build.op(
            "RotaryEmbedding",
            site.x if merged is None else merged,
            offset,
            cos_cache,
            sin_cache,
            domain=MS_DOMAIN,
            interleaved=0,
            num_heads=heads,
        )
        if merged is not None:  # split the heads after the op, where the attention can skip it
            split = build.op("Reshape", rotated, build.const(np.array([0, 0, heads, head_dim], np.int64)))
            rotated = build.op("Transpose", split, perm=[0, 2, 1, 3])
        nodes = build.commit()
        ir.convenience.replace_all_uses_with(site.add.outputs[0], rotated)
        return Rewrite("RotaryEmbedding", nodes)


class InterleavedRotaryRule(Rule):
    """x·cos + rotate_every_two(x)·sin (GPT-J) → RotaryEmbedding(interleaved=1) over the half tables."""

    name = rotary_interleaved.RULE

    def match(self, model: ir.Model, state: RotaryState) -> list[rotary_interleaved.Site]:
        return state.interleaved

    def site_name(self, site: rotary_interleaved.Site) -> str:
        return site.add.name or site.add.outputs[0].name

    def check(self, site: rotary_interleaved.Site, state: RotaryState) -> str | None:
        return rotary_interleaved.check(site, state.shapes)

    def rewrite(self, model: ir.Model, site: rotary_interleaved.Site, state: RotaryState) -> Rewrite:
        state.fused += 1
        prefix = f"txcompile_rotary_{state.fused}"
        nodes = rotary_interleaved.rewrite(model.graph, site, state.shapes, prefix, state.caches)
        return Rewrite("RotaryEmbedding", nodes)


def head_split_source(x: ir.Value, shapes: Shapes) -> ir.Value | None:
    """x3 [B, S, N·D] when x [B, N, S, D] is Transpose(0, 2, 1, 3)(Reshape(x3)), the exporters'
    head split: RotaryEmbedding then rotates x3 itself (it takes [B, S, N·D] with num_heads), and
    a fused attention reading the rotated value as [B, S, hidden] needs no head merge."""
    shape = shapes(x)
    if shape is None or len(shape) != 4:
        return None
    batch, heads, seq, head_dim = shape
    return merged_heads(x, (0, 2, 1, 3), seq, Layout(batch, heads, seq, seq, head_dim), shapes)


def head_split_values(x: ir.Value) -> list[ir.Value]:
    """The values head_split_source reads the shapes of."""
    transpose = x.producer()
    reshape = transpose.inputs[0].producer() if perm(transpose) is not None else None
    if reshape is None or reshape.op_type != "Reshape":
        return []
    return [reshape.inputs[0], reshape.outputs[0]]


def _row_positions(build: GraphBuilder, cos: ir.Value, x: ir.Value) -> ir.Value:
    """Position ids [B, S] into the flattened cos [R·S, half] (R = 1 or B): row b reads
    b·S + s when cos has a row per batch row, s when one row is shared (Expand)."""
    rows, seq = build.op("Shape", cos, start=0, end=1), build.op("Shape", cos, start=-2, end=-1)
    count = build.op("Squeeze", build.op("Mul", rows, seq), build.const(np.array([0], np.int64)))
    flat = build.op("Range", build.const(np.array(0, np.int64)), count, build.const(np.array(1, np.int64)))
    table = build.op("Reshape", flat, build.op("Concat", rows, seq, axis=0))
    batch = build.op("Shape", x, start=0, end=1)
    return build.op("Expand", table, build.op("Concat", batch, seq, axis=0))


class FuseRotary(RulePass):
    name = "fuse-rotary"
    summary = "x·cos + rotate_half(x)·sin → com.microsoft.RotaryEmbedding (Q and K of every layer)"
    rules = (RotaryRule, InterleavedRotaryRule)

    def prepare(self, model: ir.Model) -> RotaryState:
        sites = [site for node in model.graph if (site := match(node)) is not None]
        interleaved = [site for node in model.graph if (site := rotary_interleaved.match(node)) is not None]
        values = [
            v
            for s in sites
            for v in (s.x, s.cos, s.sin, *(n.outputs[0] for n in s.half_slices), *head_split_values(s.x))
        ]
        values += [
            v for s in interleaved for v in (s.x, s.cos, s.sin, s.cos_half, s.sin_half) if v is not None
        ]
        feeds = self.context.feeds
        state = RotaryState(sites, Shapes(probe_shapes(model, values, feeds) if values else {}))
        state.interleaved = interleaved
        folded = [v for s in sites for v in folded_tables(s)]
        if folded:
            state.tables = probe_values(model, folded, feeds)
        return state

    def finish(self, model: ir.Model, state: RotaryState, records: list[SiteRecord]) -> None:
        if state.fused:
            model.opset_imports.setdefault(MS_DOMAIN, 1)
        super().finish(model, state, records)
