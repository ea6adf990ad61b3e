"""Fuse GELU-family activations into the com.microsoft kernels ORT's CPU provider runs in fp32.

Exporters write GELU three ways: dynamo emits ONNX ``Gelu`` (opset 20), TorchScript the erf
formula 0.5·x·(1 + erf(x/√2)), GPT-2's ``gelu_new`` the tanh formula. Each becomes ``Gelu`` or
``FastGelu``; a bias Add in front folds in (``BiasGelu``, ``FastGelu``'s bias input); CLIP's
x·sigmoid(1.702·x) becomes ``QuickGelu``. The formula rules are onnxscript's; the rewriter only
matches when every intermediate value has no other consumer.

SiLU-gated MLPs (LLaMA) stay as they are: ORT has no fp32 CPU kernel for a gated MLP.
"""

from __future__ import annotations

import onnx_ir as ir
from onnxscript.rewriter import pattern
from onnxscript.rewriter.ort_fusions import bias_gelu, erfgelu, gelu

from txcompile.passes.attention.sites import scalar_constant
from txcompile.passes.base import TxPass
from txcompile.passes.rewriting import apply_rules

MS = "com.microsoft"


class TanhGeluToFastGelu(pattern.RewriteRuleClassBase):
    """ONNX ``Gelu(approximate="tanh")`` (dynamo's gelu_new / gelu_pytorch_tanh) → FastGelu."""

    def pattern(self, op, x):
        return op.Gelu(x, _outputs=["out"])

    def check(self, context, x, out, **_) -> pattern.MatchResult:
        result = pattern.MatchResult()
        if out.producer().attributes.get_string("approximate", "none") != "tanh":
            return result.fail("exact Gelu: BiasGelu/Gelu handle it")
        return result

    def rewrite(self, op, x, **_):
        return op.FastGelu(x, _domain=MS)


class TanhGeluHalfFirst(pattern.RewriteRuleClassBase):
    """GPT-2's gelu_new: (0.5·x)·(1 + tanh(√(2/π)·(x + 0.044715·x³))) → FastGelu."""

    def pattern(self, op, x, half, cube_scale, outer_scale, one):
        inner = op.Add(x, op.Mul(op.Pow(x, 3.0), cube_scale))
        return op.Mul(op.Mul(x, half), op.Add(op.Tanh(op.Mul(inner, outer_scale)), one))

    def check(self, context, half, cube_scale, outer_scale, one, **_) -> pattern.MatchResult:
        result = pattern.MatchResult()
        expected = {"half": (half, 0.5), "cube": (cube_scale, 0.044715), "outer": (outer_scale, 0.7978845608)}
        expected["one"] = (one, 1.0)
        for name, (value, wanted) in expected.items():
            found = scalar_constant(value)
            if found is None or abs(found - wanted) > 1e-6:
                return result.fail(f"{name} constant is {found}, not {wanted}", value)
        return result

    def rewrite(self, op, x, **_):
        return op.FastGelu(x, _domain=MS)


class FastGeluBias(pattern.RewriteRuleClassBase):
    """FastGelu(x + b) with b a 1-D constant → FastGelu(x, b)."""

    def pattern(self, op, x, bias):
        return op.FastGelu(op.Add(x, bias), _domain=MS)

    def check(self, context, x, bias, **_) -> pattern.MatchResult:
        result = pattern.MatchResult()
        if bias.const_value is None or len(bias.const_value.shape) != 1:
            return result.fail("bias is not a 1-D constant", bias)
        if x.shape is not None and x.shape.rank() and x.shape[-1] != bias.const_value.shape[0]:
            return result.fail("bias does not match the last axis", bias)
        return result

    def rewrite(self, op, x, bias, **_):
        return op.FastGelu(x, bias, _domain=MS)


class QuickGelu(pattern.RewriteRuleClassBase):
    """x · sigmoid(α·x) (CLIP's quick_gelu, α = 1.702) → QuickGelu(alpha=α)."""

    def pattern(self, op, x, alpha):
        return op.Mul(x, op.Sigmoid(op.Mul(x, alpha)))

    def check(self, context, x, alpha, **_) -> pattern.MatchResult:
        result = pattern.MatchResult()
        value = scalar_constant(alpha)
        if value is None:
            return result.fail("the sigmoid's scale is not a scalar constant", alpha)
        if value == 1.0:
            return result.fail("alpha 1 is SiLU, not QuickGelu")
        return result

    def rewrite(self, op, x, alpha, **_):
        return op.QuickGelu(x, alpha=scalar_constant(alpha), _domain=MS)


def _commuted(rule_class, name: str) -> dict[str, pattern.RewriteRule]:
    return {f"{name}-{i}" if i else name: rule for i, rule in enumerate(rule_class.rule().commute())}


RULES: dict[str, pattern.RewriteRule] = {
    "gelu-erf": erfgelu.rule1,
    "gelu-erf-1": erfgelu.rule2,
    "gelu-erf-2": gelu._erf_rule,
    "gelu-tanh": gelu._tanh_rule,
    "gelu-tanh-onnx": TanhGeluToFastGelu.rule(),
    **_commuted(TanhGeluHalfFirst, "gelu-tanh-half"),
    **{f"bias-gelu-{i}" if i else "bias-gelu": r for i, r in enumerate(bias_gelu.bias_gelu_rules.rules)},
    **_commuted(FastGeluBias, "fast-gelu-bias"),
    **_commuted(QuickGelu, "quick-gelu"),
}


def _family(rule_name: str) -> str:
    """``bias-gelu-2`` → ``bias-gelu``: variants of one rule count together in the report."""
    head, _, tail = rule_name.rpartition("-")
    return head if tail.isdigit() else rule_name


class FuseActivations(TxPass):
    name = "fuse-activations"
    summary = "GELU formulas → Gelu / FastGelu, bias folded (BiasGelu), x·sigmoid(1.702x) → QuickGelu"

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        for rule_name, count in apply_rules(model, RULES).items():
            self.rule_counts[_family(rule_name)] += count
        left = [n.op_type for n in model.graph if n.op_type in ("Erf", "Tanh") and n.domain == ""]
        if left:
            self.details["left_alone"] = {
                op: f"{left.count(op)} {op} node(s) not part of a GELU formula" for op in set(left)
            }
        return ir.passes.PassResult(model, bool(self.rule_counts))
