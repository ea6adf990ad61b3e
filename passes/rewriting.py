"""Apply onnxscript rewrite rules one at a time, so each rule's count and nodes are its own."""

from __future__ import annotations

import collections
from collections.abc import Mapping

import onnx_ir as ir
from onnxscript.rewriter import pattern

from txcompile.graph.nodes import RULE_KEY, all_nodes


def apply_rules(model: ir.Model, rules: Mapping[str, pattern.RewriteRule]) -> collections.Counter[str]:
    """Run each named rule over the model; tag the nodes it creates with its name."""
    counts: collections.Counter[str] = collections.Counter()
    for name, rule in rules.items():
        before = {id(n) for n in all_nodes(model)}
        applied = pattern.RewriteRuleSet([rule]).apply_to_model(model)
        if not applied:
            continue
        counts[name] += applied
        for node in all_nodes(model):
            if id(node) not in before:
                node.metadata_props.setdefault(RULE_KEY, name)
    return counts
