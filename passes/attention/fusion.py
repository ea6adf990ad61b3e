"""Fuse every attention site into one op the target runs, in two stages.

Stage one (:mod:`.read`) reads each site once: heads, scale, mask and layout. Stage two lowers
it with the first lowering rule that takes it, in the order :func:`lowerings` gives:
com.microsoft.MultiHeadAttention (:mod:`.lower_ms`), packed com.microsoft.Attention or, for
int8, the packed-MatMul form (:mod:`.lower_packed`), GroupQueryAttention (:mod:`.lower_gqa`,
``--attention-op gqa``) or the standard ONNX ``Attention`` (:mod:`.lower_onnx`, opset 23,
``--attention-op onnx``). Masks and projection biases are :mod:`.bias`'s two rules. Every site
lands in ``details["sites"]``: fused, with the op it became, or unfused, with the first check
that failed.
"""

from __future__ import annotations

import dataclasses

import onnx_ir as ir
import onnx_ir.passes.common as common

from txcompile.graph import task_metadata
from txcompile.graph.errors import TxError
from txcompile.graph.probe import Shapes, probe_shapes, probe_values
from txcompile.passes.attention import folded_heads, gqa
from txcompile.passes.attention.lower_gqa import GroupQueryAttention
from txcompile.passes.attention.lower_ms import MultiHeadAttentionBnsh, MultiHeadAttentionBsh
from txcompile.passes.attention.lower_onnx import ONNX_ATTENTION_OPSET, OnnxAttention, OnnxAttentionBsh
from txcompile.passes.attention.lower_packed import OnnxAttentionMatMul, PackedAttention, PackedMatMul
from txcompile.passes.attention.lowering import Lowering
from txcompile.passes.attention.read import AttentionState, ReadAttention, neighbourhood
from txcompile.passes.attention.shared_cache import past_length_from_mask
from txcompile.passes.attention.sites import Site, find_sites
from txcompile.passes.norms.opset import opset_raise_problem
from txcompile.passes.rules import FUSED, Rewrite, RulePass

# The MultiHeadAttention family, most packed first; the last takes every read site. On the CPU,
# where the graph's opset may be raised to 23, ONNX Attention takes int8's packed MatMul and the
# head-split K/V (repeated or not) that MultiHeadAttention would read as [B, N, L, D]: its
# kernel is the faster one there (MultiHeadAttention over [B, L, hidden] K/V folds their biases).
MS_LOWERINGS = (
    OnnxAttentionMatMul,
    PackedMatMul,
    PackedAttention,
    MultiHeadAttentionBsh,
    OnnxAttentionBsh,
    MultiHeadAttentionBnsh,
)
LOWERINGS = {
    "ms": MS_LOWERINGS,
    "onnx": (OnnxAttention,),
    "gqa": (GroupQueryAttention, *MS_LOWERINGS),
}
ATTENTION_OPS = tuple(LOWERINGS)


def _recorded_window(model: ir.Model) -> int | None:
    """The decoder's sliding window from its generation metadata (0: none), None when not
    recorded or unreadable (``generate`` is the one to complain about the latter)."""
    try:
        generation = task_metadata.generation_of(dict(model.metadata_props), "the model")
    except TxError:
        return None
    return generation.sliding_window if generation else None


def lowerings(attention_op: str) -> tuple[Lowering, ...]:
    """The lowerings to try, first fit wins: the op ``--attention-op`` names, then the
    MultiHeadAttention forms (which of those fits is the site's layout and the precision).

    Not derived from the kernel table: at fp32 on CPU every one of these ops has a kernel, so
    the table cannot say that MultiHeadAttention is the default — that is a preference."""
    return tuple(cls() for cls in LOWERINGS[attention_op])


@dataclasses.dataclass(frozen=True)
class AttentionOptions:
    attention_op: str = "ms"  # ms: MultiHeadAttention / Attention; onnx: ONNX Attention; gqa
    precision: str | None = None

    def __post_init__(self) -> None:
        if self.attention_op not in ATTENTION_OPS:
            raise TxError(f"--attention-op {self.attention_op!r}: choose one of {', '.join(ATTENTION_OPS)}")


class LowerAttention(ReadAttention):
    """The read rule, then the first lowering that takes the site; a lowering the flag asked
    for and that refused leaves its reason as the site's note. A site no lowering takes (a
    soft-cap MultiHeadAttention cannot apply) stays unfused with the last one's reason."""

    def check(self, site: Site, state: AttentionState) -> str | None:
        reason = super().check(site, state)
        if reason is None:
            lowering, reasons = _choose(site, state)
            if lowering is None:
                reason = "; ".join([reasons[-1], *_notes(state, reasons[:-1])])
        return reason

    def rewrite(self, model: ir.Model, site: Site, state: AttentionState) -> Rewrite:
        lowering, reasons = _choose(site, state)
        notes = _notes(state, reasons)
        done = lowering.rewrite(model, site, state)
        if notes:
            done.extra["note"] = "; ".join(notes)
        return done


def _notes(state: AttentionState, reasons: list[str]) -> list[str]:
    """What the lowerings the flag asked for said when they refused (``not GroupQueryAttention: …``)."""
    return [f"{low.note}: {why}" for low, why in zip(state.lowerings, reasons, strict=False) if low.note]


def _choose(site: Site, state: AttentionState) -> tuple[Lowering | None, list[str]]:
    """The first lowering that takes the read site, and the reasons of those before it."""
    reasons = []
    for lowering in state.lowerings:
        reason = lowering.check(site, state)
        if reason is None:
            return lowering, reasons
        reasons.append(reason)
    return None, reasons


class FuseAttention(RulePass):
    """Read every Softmax site once, lower each that reads to one fused op, record every site."""

    name = "fuse-attention"
    summary = "fuse every Softmax-between-two-MatMuls site into MultiHeadAttention, ONNX Attention or GQA"
    Options = AttentionOptions
    rules = (LowerAttention,)

    def prepare(self, model: ir.Model) -> AttentionState:
        feeds, op_choice = self.context.feeds, self.options.attention_op
        refused = self._split_folded_heads(model, feeds)
        sites = find_sites(model.graph, model.opset_imports.get("", 1))
        for site in sites:
            if site.reason is not None and site.softmax in refused:
                site.reason = f"heads folded into the batch: {refused[site.softmax]}"
        readable = [s for s in sites if s.reason is None]
        values = [v for s in readable for v in neighbourhood(s)]
        shapes = Shapes(probe_shapes(model, values, feeds) if readable else {})
        state = AttentionState(
            sites, shapes, self.rule_counts, feeds, self.context.target, self.options.precision
        )
        state.lowerings = lowerings(op_choice)
        state.opset = model.opset_imports.get("", 1)
        state.opset_problem = opset_raise_problem(model, ONNX_ATTENTION_OPSET)
        if op_choice == "gqa":
            terms = [t.value for s in readable for t in s.biases]
            state.mask_values = probe_values(model, terms, feeds) if terms else {}
            state.padding, state.padding_reason = gqa.padding_input(feeds)
            state.sliding_window = _recorded_window(model)
        return state

    def _split_folded_heads(self, model: ir.Model, feeds) -> dict[ir.Node, str]:
        """Sites written over [B·N]-folded heads, rewritten over split heads; the rest with why."""
        found, refused = folded_heads.find(model.graph)
        if not found:
            return refused
        shapes = Shapes(probe_shapes(model, [v for f in found for v in f.probed()], feeds))
        for folded in found:
            reason = folded_heads.split(model.graph, folded, shapes)
            if reason is None:
                self.rule_counts[folded_heads.RULE] += 1
            else:
                refused[folded.softmax] = reason
        if len(refused) < len(found):
            common.RemoveUnusedNodesPass()(model)  # the folded products and views
        return refused

    def finish(self, model: ir.Model, state: AttentionState, records) -> None:
        """GroupQueryAttention over the cache: the graph reads the past length from the mask, so
        that a generate loop may hand it one buffer as past and present."""
        super().finish(model, state, records)  # the Concats the ops replaced go first
        if self.options.attention_op == "gqa" and any(r.status == FUSED for r in records):
            self.details["shared_cache"] = past_length_from_mask(model, state.padding)
            if self.details["shared_cache"]:
                common.RemoveUnusedNodesPass()(model)

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        result = super().call(model)
        self.details["attention_op"] = self.options.attention_op
        return ir.passes.PassResult(model, result.modified or bool(self.rule_counts[folded_heads.RULE]))
