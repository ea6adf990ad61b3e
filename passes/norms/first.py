"""Rules that compete for one site: the first whose check passes rewrites it.

fold-batchnorm folds each BatchNorm into one neighbour, trying the folds in a fixed order;
applying each rule over the whole graph in turn would fold in another order (and so into
other weights). The record is the shared one (passes/rules.py): fused under the rule that
applied, or unfused under the family's name with the reason the last rule gave.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import onnx_ir as ir

from txcompile.passes.base import TxPass
from txcompile.passes.rules import FUSED, UNFUSED, Rule, SiteRecord


def apply_first(
    tx_pass: TxPass, model: ir.Model, site: Any, rules: Sequence[Rule], state: Any, family: str
) -> SiteRecord:
    name = rules[0].site_name(site)
    reason = None
    for rule in rules:
        reason = rule.check(site, state)
        if reason is None:
            done = rule.rewrite(model, site, state)
            label = done.rule or rule.name
            tx_pass.tag(done.nodes, label)
            tx_pass.rule_counts[label] += 1
            return SiteRecord(name, label, FUSED, op=done.op, extra=done.extra)
    return SiteRecord(name, family, UNFUSED, reason=reason)
