"""Cleanup: constant folding, shape-chain simplification, identity/CSE/dead-code removal.

Each is a thin pass over what onnxscript.optimizer and onnx_ir.passes already do, split so the
report shows which step changed what.
"""

from __future__ import annotations

import onnx_ir as ir
import onnx_ir.passes.common as common
import onnxscript.optimizer
from onnxscript.rewriter.rules import common as rules

from txcompile.graph.nodes import all_nodes
from txcompile.passes.base import TxPass
from txcompile.passes.rules import FUSED, PatternRule, apply_together

SHAPE_RULES = {
    "add-zero": rules.add_0_rule,
    "sub-zero": rules.sub_0_rule,
    "mul-by-one": rules.mul_by_1_rule,
    "div-by-one": rules.div_by_1_rule,
    "dropout-inference": rules.dropout_inference_rule,
    "dropout-zero": rules.dropout_zero_rule,
    "cast-identity": rules.no_op_cast_rule,
    "cast-cast": rules.cast_cast_rule,
    "expand-identity": rules.no_op_expand_rule,
    "transpose-identity": rules.no_op_transpose_rule,
    "transpose-transpose": rules.transpose_transpose_rule,
    "reshape-reshape": rules.reshape_reshape_rule,
    "flatten-to-reshape": rules.flatten_to_reshape_rule,
    "squeeze-reshape-1d": rules.squeeze_reshape_1d_rule,
    "unsqueeze-unsqueeze": rules.unsqueeze_unsqueeze_rule,
    "collapse-slice": rules.collapse_slice_rule,
    "collapse-slice2": rules.collapse_slice2_rule,
    "materialize-reshape-shape": rules.materialize_reshape_shape_rule,
    "cast-constant-of-shape": rules.cast_constant_of_shape_rule,
    "cast-constant-of-shape-no-value": rules.cast_constant_of_shape_without_value_rule,
    "scatter-nd-all-static": rules.no_op_static_scatter_nd_rule,
    "scatter-nd-all-dynamic": rules.no_op_dynamic_scatter_nd_rule,
    **{
        f"expand-before-binary-op-{i}": rule
        for i, rule in enumerate(rules.expand_before_binary_op_rules.rules)
    },
}
PATTERNS = tuple(PatternRule(name, rule) for name, rule in SHAPE_RULES.items())


class FoldConstants(TxPass):
    name = "fold-constants"
    summary = "evaluate every node whose inputs are constants (onnxscript.optimizer)"

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        before = len(all_nodes(model))
        result = onnxscript.optimizer.fold_constants(model)
        folded = before - len(all_nodes(model))
        if folded > 0:
            self.rule_counts["folded"] = folded
        return ir.passes.PassResult(model, bool(result.modified))


class SimplifyShapes(TxPass):
    name = "simplify-shapes"
    summary = "drop no-op arithmetic, casts, expands; merge reshape/slice/transpose chains"

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        records = apply_together(self, model, PATTERNS)  # no near misses: every Add is one for add-zero
        fused = sum(record.status == FUSED for record in records)
        self.details = {
            "sites": [r.as_dict() for r in records],
            "fused": fused,
            "unfused": len(records) - fused,
        }
        return ir.passes.PassResult(model, bool(self.rule_counts))


class _Wrapped(TxPass):
    """A pass that runs onnx_ir passes and counts the nodes they removed."""

    inner: tuple[type[ir.passes.PassBase], ...] = ()
    counted_as = "removed"

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        before = len(all_nodes(model))
        modified = False
        for inner in self.inner:
            modified |= inner()(model).modified
        removed = before - len(all_nodes(model))
        if removed > 0:
            self.rule_counts[self.counted_as] = removed
        return ir.passes.PassResult(model, modified)


class RemoveIdentity(_Wrapped):
    name = "remove-identity"
    summary = "remove Identity nodes (onnx_ir)"
    inner = (common.IdentityEliminationPass,)
    counted_as = "identity"


class EliminateCommonSubexpressions(_Wrapped):
    name = "eliminate-cse"
    summary = "merge nodes that compute the same value (onnx_ir)"
    inner = (common.CommonSubexpressionEliminationPass,)
    counted_as = "merged"


class RemoveUnused(_Wrapped):
    name = "remove-unused"
    summary = "remove dead nodes, unused functions and opset imports (onnx_ir)"
    inner = (common.RemoveUnusedNodesPass, common.RemoveUnusedFunctionsPass, common.RemoveUnusedOpsetsPass)
    counted_as = "dead"
