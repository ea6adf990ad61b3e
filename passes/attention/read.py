"""Stage one of attention fusion: read a site once — heads, scale, mask and layout.

:mod:`.sites` finds the Softmax-between-two-MatMuls structure; this module adds what the
shapes say (batch, heads, lengths, head size) and how Q, K and V are laid out: merged
[B, S, hidden] tensors split into heads by Reshape+Transpose, or K as a transposed
[B, N, L, D] tensor. Every lowering reads the same :class:`Reading`, so no lowering
re-derives a layout and they cannot disagree about a site.
"""

from __future__ import annotations

import collections
import dataclasses
from collections.abc import Mapping
from typing import Any

import numpy as np
import onnx_ir as ir

from txcompile.graph.probe import Shapes
from txcompile.passes.attention.sites import Site
from txcompile.passes.rules import Rule

READ_RULE = "read-attention"  # the rule of unfused sites: the read said why not


@dataclasses.dataclass
class Layout:
    """How one site's tensors are shaped: [B, N, S, D] queries against L keys."""

    batch: int
    heads: int
    seq: int
    keys: int
    head_dim: int

    @property
    def hidden(self) -> int:
        return self.heads * self.head_dim


@dataclasses.dataclass
class Reading:
    """One site as every lowering sees it: structure, shapes and the forms Q, K, V come in."""

    site: Site
    index: int  # the site's place in the graph (names what its fusion builds)
    layout: Layout
    query_bsh: ir.Value | None  # Q as [B, S, hidden] before its head split, if the graph has it
    key_bsh: ir.Value | None  # K as [B, L, hidden], likewise
    value_bsh: ir.Value | None  # V as [B, L, hidden], likewise
    key_bnsh: ir.Value | None  # K as [B, N, L, D] behind Kᵀ, if the graph has it

    def facts(self) -> dict[str, Any]:
        """What the coverage report says about a fused site: its scale and mask kinds."""
        masks = sorted({t.kind for t in self.site.biases})
        return {"scale": round(self.site.scale, 6), "bias": masks or None}


@dataclasses.dataclass
class AttentionState:
    """What every attention rule reads, made once per run: sites, shapes, options, caches."""

    sites: list[Site]
    shapes: Shapes
    counts: collections.Counter  # the pass's rule_counts: helper rules count into it
    feeds: Mapping[str, np.ndarray]
    target: str
    precision: str | None = None
    opset: int = 17  # the graph's default-domain opset (how ReduceMax takes its axes)
    opset_problem: str | None = None  # why it cannot be raised to ONNX Attention's 23, if it cannot
    mask_values: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)  # GQA's mask check
    padding: str | None = None  # the 2-D attention-mask input GroupQueryAttention reads
    sliding_window: int | None = None  # the decoder's, from its generation metadata (0: none; None: unknown)
    padding_reason: str | None = None
    bias_cache: dict[tuple, ir.Value] = dataclasses.field(default_factory=dict)
    lengths_cache: dict[object, tuple[ir.Value, ir.Value]] = dataclasses.field(default_factory=dict)
    readings: dict[int, Reading | None] = dataclasses.field(default_factory=dict)
    lowerings: tuple = ()  # the lowering rules to try, in order (fusion.lowerings)

    def reading(self, site: Site) -> Reading | None:
        """The site's reading, made on first ask (None when the site does not read as attention)."""
        key = id(site)
        if key not in self.readings:
            index = next(i for i, s in enumerate(self.sites) if s is site)
            self.readings[key] = read(site, index, self.shapes) if site.reason is None else None
        return self.readings[key]


def perm(node: ir.Node | None) -> tuple[int, ...] | None:
    if node is None or node.op_type != "Transpose":
        return None
    value = node.attributes.get_ints("perm")
    return tuple(value) if value is not None else None


def merged_heads(value: ir.Value, order: tuple, rows: int, layout: Layout, shapes: Shapes) -> ir.Value | None:
    """x3 when ``value`` is Transpose(order, Reshape(x3 [B, rows, hidden] → [B, rows, N, D]))."""
    transpose = value.producer()
    if perm(transpose) != order:
        return None
    reshape = transpose.inputs[0].producer()
    if reshape is None or reshape.op_type != "Reshape":
        return None
    merged = reshape.inputs[0]
    b, n, d = layout.batch, layout.heads, layout.head_dim
    if shapes(merged) != (b, rows, n * d) or shapes(reshape.outputs[0]) != (b, rows, n, d):
        return None
    return merged


def untransposed_key(key_t: ir.Value, layout: Layout, shapes: Shapes) -> ir.Value | None:
    """K [B, N, L, D] behind Kᵀ: Transpose(0, 1, 3, 2), or torch's sdpa decomposition
    Reshape(Transpose(0, 2, 1)(Reshape(K, [B·N, L, D])), [B, N, D, L])."""
    producer = key_t.producer()
    if perm(producer) == (0, 1, 3, 2):
        return producer.inputs[0]
    if producer is None or producer.op_type != "Reshape":
        return None
    transpose = producer.inputs[0].producer()
    if perm(transpose) != (0, 2, 1):
        return None
    flatten = transpose.inputs[0].producer()
    if flatten is None or flatten.op_type != "Reshape":
        return None
    key = flatten.inputs[0]
    b, n, length, d = layout.batch, layout.heads, layout.keys, layout.head_dim
    if shapes(key) != (b, n, length, d) or shapes(flatten.outputs[0]) != (b * n, length, d):
        return None
    return key


def neighbourhood(site: Site) -> list[ir.Value]:
    """The values whose shapes reading may ask for (probed in one ORT run for all sites)."""
    values = [site.query, site.key_t, site.value, *(t.value for t in site.biases)]
    starts = [site.query, site.key_t, site.value]
    while starts:
        value = starts.pop()
        for _ in range(10):  # sdpa decompositions put ~8 ops between Kᵀ and the cache
            producer = value.producer() if value is not None else None
            if producer is None or not producer.inputs:
                break
            if producer.op_type == "Concat" and len(producer.inputs) == 2:
                starts.append(producer.inputs[1])  # the new K/V a cache appends to the past
            value = producer.inputs[0]
            values.extend([value, producer.outputs[0]])
    if site.pv is not None:
        output = site.pv.outputs[0]
        values.append(output)
        for _ in range(2):
            uses = output.uses()
            if len(uses) != 1:
                break
            output = uses[0][0].outputs[0]
            values.append(output)
    return [v for v in values if v is not None]


def read_layout(site: Site, shapes: Shapes) -> Layout | None:
    """Batch, heads, lengths and head size from the shapes; on a mismatch the site fails with why."""
    query, key_t, value = shapes(site.query), shapes(site.key_t), shapes(site.value)
    if query is None or key_t is None or value is None:
        site.fail("shapes of Q, K, V unknown (no static shapes and no verification inputs)")
        return None
    if not len(query) == len(key_t) == len(value) == 4:
        site.fail(f"Q, Kᵀ, V are not 4-D head-split tensors ({len(query)}, {len(key_t)}, {len(value)})")
        return None
    batch, heads, seq, head_dim = query
    if key_t[1] != heads or value[1] != heads:
        site.fail(f"K/V have {key_t[1]}/{value[1]} heads, Q has {heads} (grouped KV not repeated)")
        return None
    if key_t[2] != head_dim or value[3] != head_dim:
        site.fail(f"head sizes differ: Q {head_dim}, K {key_t[2]}, V {value[3]}")
        return None
    if key_t[3] != value[2]:
        site.fail(f"K has {key_t[3]} positions, V has {value[2]}")
        return None
    if key_t[0] != batch or value[0] != batch:
        site.fail("Q, K and V disagree on the batch size")
        return None
    return Layout(batch, heads, seq, key_t[3], head_dim)


def read(site: Site, index: int, shapes: Shapes) -> Reading | None:
    """The whole reading of a structurally sound site, or None (``site.reason`` says why)."""
    layout = read_layout(site, shapes)
    if layout is None:
        return None
    query = merged_heads(site.query, (0, 2, 1, 3), layout.seq, layout, shapes)
    key = merged_heads(site.key_t, (0, 2, 3, 1), layout.keys, layout, shapes)
    key_bnsh = untransposed_key(site.key_t, layout, shapes) if key is None else None
    if key_bnsh is not None:
        key = merged_heads(key_bnsh, (0, 2, 1, 3), layout.keys, layout, shapes)
    value = merged_heads(site.value, (0, 2, 1, 3), layout.keys, layout, shapes)
    return Reading(site, index, layout, query, key, value, key_bnsh)


class ReadAttention(Rule):
    """Stage one as a rule: every Softmax is a site; ``check`` is the read's verdict.

    The reading is made when a site is checked — just before it is lowered, as the graph then
    stands — and kept in the state for the lowering rules. The rewrite is stage two's
    (fusion.LowerAttention), so this module needs no lowering.
    """

    name = READ_RULE

    def match(self, model: ir.Model, state) -> list[Site]:
        return list(state.sites)

    def site_name(self, site: Site) -> str:
        return site.name

    def check(self, site: Site, state: AttentionState) -> str | None:
        state.reading(site)
        return site.reason
