"""Fuse GELU-family activations into the com.microsoft kernels ORT's CPU provider runs in fp32.

Exporters write GELU three ways: dynamo emits ONNX ``Gelu`` (opset 20), TorchScript the erf
formula 0.5·x·(1 + erf(x/√2)), GPT-2's ``gelu_new`` the tanh formula. Each becomes ``Gelu`` or
``FastGelu``; a bias Add in front folds in (``BiasGelu``, ``FastGelu``'s bias input); CLIP's
x·sigmoid(1.702·x) becomes ``QuickGelu``. The formula rules are onnxscript's; the rewriter only
matches when every intermediate value has no other consumer. A Tanh / Erf no pattern took is
then tried by value (``gelu-by-value``, gelu_value.py: BLOOM's arrangement of the tanh formula),
and the bias rules run again over what it made.

SiLU-gated MLPs (LLaMA) stay as they are: ORT has no fp32 CPU kernel for a gated MLP.
"""

from __future__ import annotations

import collections

import onnx_ir as ir
import onnx_ir.passes.common as common
from onnxscript.rewriter import pattern
from onnxscript.rewriter.ort_fusions import bias_gelu, erfgelu, gelu

from txcompile.graph.constants import constant_scalar
from txcompile.graph.nodes import MS_DOMAIN, op_key
from txcompile.passes.attention import gelu_value
from txcompile.passes.base import TxPass
from txcompile.passes.rules import FUSED, UNFUSED, PatternRule, SiteRecord, apply_patterns


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
        return op.FastGelu(x, _domain=MS_DOMAIN)


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
            found = constant_scalar(value)
            if found is None or abs(found - wanted) > 1e-6:
                return result.fail(f"{name} constant is {found}, not {wanted}", value)
        return result

    def rewrite(self, op, x, **_):
        return op.FastGelu(x, _domain=MS_DOMAIN)


class FastGeluBias(pattern.RewriteRuleClassBase):
    """FastGelu(x + b) with b a 1-D constant → FastGelu(x, b)."""

    def pattern(self, op, x, bias):
        return op.FastGelu(op.Add(x, bias), _domain=MS_DOMAIN)

    def check(self, context, x, bias, **_) -> pattern.MatchResult:
        result = pattern.MatchResult()
        if bias.const_value is None or len(bias.const_value.shape) != 1:
            return result.fail("bias is not a 1-D constant", bias)
        if x.shape is not None and x.shape.rank() and x.shape[-1] != bias.const_value.shape[0]:
            return result.fail("bias does not match the last axis", bias)
        return result

    def rewrite(self, op, x, bias, **_):
        return op.FastGelu(x, bias, _domain=MS_DOMAIN)


class QuickGelu(pattern.RewriteRuleClassBase):
    """x · sigmoid(α·x) (CLIP's quick_gelu, α = 1.702) → QuickGelu(alpha=α)."""

    def pattern(self, op, x, alpha):
        return op.Mul(x, op.Sigmoid(op.Mul(x, alpha)))

    def check(self, context, x, alpha, **_) -> pattern.MatchResult:
        result = pattern.MatchResult()
        value = constant_scalar(alpha)
        if value is None:
            return result.fail("the sigmoid's scale is not a scalar constant", alpha)
        if value == 1.0:
            return result.fail("alpha 1 is SiLU, not QuickGelu")
        return result

    def rewrite(self, op, x, alpha, **_):
        return op.QuickGelu(x, alpha=constant_scalar(alpha), _domain=MS_DOMAIN)


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


PATTERNS = tuple(PatternRule(name, rule) for name, rule in RULES.items())
BIAS_PATTERNS = tuple(rule for rule in PATTERNS if rule.name.startswith(("bias-gelu", "fast-gelu-bias")))
BY_VALUE = "gelu-by-value"


def _family(rule_name: str) -> str:
    """``bias-gelu-2`` → ``bias-gelu``: variants of one rule count together in the report."""
    head, _, tail = rule_name.rpartition("-")
    return head if tail.isdigit() else rule_name


def _near_misses(model: ir.Model, fused: set[tuple[str, str]]) -> list[SiteRecord]:
    """One record per site and rule family: the variant that matched furthest gives the reason."""
    best: dict[tuple[str, str], SiteRecord] = {}
    for miss in (miss for rule in PATTERNS for miss in rule.near_misses(model, complete=True)):
        miss.rule = _family(miss.rule)
        key = (miss.site, miss.rule)
        if key not in fused and (key not in best or miss.score > best[key].score):
            best[key] = miss
    return list(best.values())


class FuseActivations(TxPass):
    """Applies the patterns one at a time: nodes keep their variant's name (``bias-gelu-1``),
    counts and site records the family's; near misses are listed with the tracer's reason."""

    name = "fuse-activations"
    summary = "GELU formulas → Gelu / FastGelu, bias folded (BiasGelu), x·sigmoid(1.702x) → QuickGelu"

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        records = apply_patterns(self, model, PATTERNS)
        by_value = self._by_value(model)
        if any(r.status == FUSED for r in by_value):
            records += apply_patterns(self, model, BIAS_PATTERNS)
        records += by_value
        for record in records:
            record.rule = _family(record.rule)
        records += _near_misses(model, {(r.site, r.rule) for r in records})
        variants, self.rule_counts = self.rule_counts, collections.Counter()
        for variant, count in variants.items():
            self.rule_counts[_family(variant)] += count
        fused = sum(record.status == FUSED for record in records)
        self.details = {
            "sites": [r.as_dict() for r in records],
            "fused": fused,
            "unfused": len(records) - fused,
        }
        left = [n.op_type for n in model.graph if n.op_type in ("Erf", "Tanh") and n.domain == ""]
        if left:
            self.details["left_alone"] = {
                op: f"{left.count(op)} {op} node(s) not part of a GELU formula" for op in set(left)
            }
        return ir.passes.PassResult(model, bool(self.rule_counts))

    def _by_value(self, model: ir.Model) -> list[SiteRecord]:
        """Every Tanh / Erf the patterns left: GELU by its values, or the reason it is not."""
        records = []
        graph = model.graph
        for anchor in [n for n in graph if n.op_type in gelu_value.ANCHORS and n.domain in ("", "ai.onnx")]:
            if anchor.graph is None:  # inside a region an earlier anchor rewrote
                continue
            site = anchor.name or anchor.outputs[0].name
            region = gelu_value.find(anchor)
            if isinstance(region, str):
                records.append(SiteRecord(site, BY_VALUE, UNFUSED, reason=region))
                continue
            node = gelu_value.rewrite(graph, region, f"{site}/{region.op_type}")
            self.tag([node], BY_VALUE)
            self.rule_counts[BY_VALUE] += 1
            extra = {"form": region.form, "max_diff": region.max_diff}
            records.append(SiteRecord(site, BY_VALUE, FUSED, op=op_key(node), extra=extra))
        if any(r.status == FUSED for r in records):
            common.RemoveUnusedNodesPass()(model)
        return records
