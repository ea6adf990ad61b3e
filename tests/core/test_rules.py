"""The rule machinery itself: RulePass records, tags and counts; PatternRule traces near misses."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest
from onnxscript.rewriter import pattern

from txcompile.graph import ort as rt
from txcompile.graph.build import GraphBuilder
from txcompile.graph.nodes import RULE_KEY
from txcompile.passes.rules import FUSED, UNFUSED, PatternRule, Rewrite, Rule, RulePass, apply_patterns


class DoubleRelu(Rule):
    """Relu(Relu(x)) → Relu(x), unless the inner Relu's output is read elsewhere."""

    name = "double-relu"

    def match(self, model, state):
        for node in model.graph:
            inner = node.inputs[0].producer() if node.op_type == "Relu" else None
            if inner is not None and inner.op_type == "Relu":
                yield node

    def check(self, site, state):
        inner = site.inputs[0]
        return "the inner Relu's output has another consumer" if len(inner.uses()) > 1 else None

    def rewrite(self, model, site, state):
        b = GraphBuilder(model.graph, site.name, anchor=site)
        out = b.op("Relu", site.inputs[0].producer().inputs[0])
        name = site.outputs[0].name
        site.outputs[0].replace_all_uses_with(out, replace_graph_outputs=True)
        site.outputs[0].name, out.name = None, name
        return Rewrite("Relu", b.commit())


class DropDoubleRelu(RulePass):
    name = "drop-double-relu"
    summary = "test pass"
    rules = (DoubleRelu,)


def _model(extra_consumer: bool) -> ir.Model:
    x = ir.val("x", ir.DataType.FLOAT, ir.Shape([2, 3]))
    inner = ir.node("Relu", [x], name="inner")
    outer = ir.node("Relu", [inner.outputs[0]], name="outer")
    nodes = [inner, outer]
    outer.outputs[0].name = "y"
    outputs = [outer.outputs[0]]
    if extra_consumer:
        tap = ir.node("Neg", [inner.outputs[0]], name="tap")
        tap.outputs[0].name = "z"
        nodes.append(tap)
        outputs.append(tap.outputs[0])
    graph = ir.Graph([x], outputs, nodes=nodes, opset_imports={"": 18}, name="g")
    return ir.Model(graph, ir_version=10)


def _run(model: ir.Model, x: np.ndarray) -> list[np.ndarray]:
    proto = ir.serde.serialize_model(model)
    return list(rt.run(rt.create_session(proto, "cpu"), {"x": x}).values())


def test_rule_pass_records_tags_and_counts_a_fused_site():
    model = _model(extra_consumer=False)
    x = np.random.default_rng(0).standard_normal((2, 3)).astype(np.float32)
    before = _run(model, x)
    tx_pass = DropDoubleRelu()
    result = tx_pass(model)
    assert result.modified
    assert [n.op_type for n in model.graph] == ["Relu"]  # both old Relus gone (dead-code removal)
    assert model.graph[0].metadata_props[RULE_KEY] == "double-relu"
    assert tx_pass.rule_counts == {"double-relu": 1}
    assert tx_pass.details["sites"] == [
        {"site": "outer", "rule": "double-relu", "status": FUSED, "op": "Relu", "reason": None}
    ]
    assert (tx_pass.details["fused"], tx_pass.details["unfused"]) == (1, 0)
    np.testing.assert_array_equal(_run(model, x)[0], before[0])


def test_rule_pass_records_the_reason_of_a_site_it_leaves():
    model = _model(extra_consumer=True)
    tx_pass = DropDoubleRelu()
    result = tx_pass(model)
    assert not result.modified
    assert [n.name for n in model.graph] == ["inner", "outer", "tap"]
    (record,) = tx_pass.details["sites"]
    assert record["status"] == UNFUSED
    assert record["reason"] == "the inner Relu's output has another consumer"
    assert not tx_pass.rule_counts


def test_rule_pass_with_no_site_records_nothing():
    x = ir.val("x", ir.DataType.FLOAT, ir.Shape([2]))
    neg = ir.node("Neg", [x], name="neg")
    graph = ir.Graph([x], [neg.outputs[0]], nodes=[neg], opset_imports={"": 18}, name="g")
    tx_pass = DropDoubleRelu()
    assert not tx_pass(ir.Model(graph, ir_version=10)).modified
    assert tx_pass.details == {"sites": [], "fused": 0, "unfused": 0}


def _neg_neg_rule() -> pattern.RewriteRule:
    """Neg(Neg(x)) → Identity(x), only for float inputs (the condition gives the near miss)."""

    def target(op, x):
        return op.Neg(op.Neg(x))

    def replacement(op, x):
        return op.Identity(x)

    def condition(context, x):
        check = pattern.MatchResult()
        if x.dtype != ir.DataType.FLOAT:
            return check.fail("input is not float")
        return check

    return pattern.RewriteRule(target, replacement, condition)


def _neg_neg_model(dtype: ir.DataType) -> ir.Model:
    x = ir.val("x", dtype, ir.Shape([2]))
    first = ir.node("Neg", [x], name="first")
    second = ir.node("Neg", [first.outputs[0]], name="second")
    second.outputs[0].name = "y"
    graph = ir.Graph([x], [second.outputs[0]], nodes=[first, second], opset_imports={"": 18}, name="g")
    return ir.Model(graph, ir_version=10)


def test_pattern_rule_tags_what_it_made_under_its_family_name():
    model = _neg_neg_model(ir.DataType.FLOAT)
    tx_pass = DropDoubleRelu()  # any TxPass: apply_patterns only counts on it
    records = apply_patterns(
        tx_pass, model, [PatternRule("neg-neg-2", _neg_neg_rule())], {"neg-neg-2": "neg-neg"}
    )
    assert tx_pass.rule_counts == {"neg-neg": 1}
    (record,) = records
    assert (record.rule, record.status, record.op) == ("neg-neg", FUSED, "Identity")
    identity = next(n for n in model.graph if n.op_type == "Identity")
    assert identity.metadata_props[RULE_KEY] == "neg-neg"


def test_pattern_rule_near_miss_gives_the_condition_reason_and_changes_nothing():
    model = _neg_neg_model(ir.DataType.DOUBLE)
    rule = PatternRule("neg-neg", _neg_neg_rule())
    (miss,) = rule.near_misses(model)
    assert (miss.status, miss.rule, miss.reason) == (UNFUSED, "neg-neg", "input is not float")
    assert [n.op_type for n in model.graph] == ["Neg", "Neg"]
    assert rule.apply(model) == (0, [])


@pytest.mark.parametrize("shared", [False, True])
def test_pattern_rule_keeps_a_shared_intermediate(shared):
    """When the inner Neg feeds another node, the rewrite must leave that value intact."""
    model = _neg_neg_model(ir.DataType.FLOAT)
    if shared:
        first = model.graph[0]
        tap = ir.node("Abs", [first.outputs[0]], name="tap")
        tap.outputs[0].name = "z"
        model.graph.append(tap)
        model.graph.outputs.append(tap.outputs[0])
    x = np.array([1.5, -2.0], np.float32)
    expected = _run(model, x)
    PatternRule("neg-neg", _neg_neg_rule()).apply(model)
    assert [a.tolist() for a in _run(model, x)] == [a.tolist() for a in expected]
    assert ("Neg" in [n.op_type for n in model.graph]) == shared
