"""The rule, the unit of every rewrite, and the one pass that applies a family's rules.

A rule is a named object in three steps: ``match`` finds its candidate sites, ``check`` says
why a site cannot be rewritten (``None`` when it can), ``rewrite`` changes the graph and says
what it made. :class:`RulePass` applies a family's rules in order, tags the nodes each rule
creates with the rule's name, and fills one :class:`SiteRecord` per site — fused with its op,
or unfused with its reason — which the report shows the same way for every family.

Rules written as onnxscript patterns (``RewriteRuleClassBase``) join through
:class:`PatternRule`: the rewriter applies them, and its tracer supplies the reasons for the
near misses.
"""

from __future__ import annotations

import collections
import dataclasses
from collections.abc import Iterable, Mapping
from typing import Any, ClassVar

import onnx_ir as ir
import onnx_ir.passes.common as common
from onnxscript.rewriter import pattern

from txcompile.graph.nodes import RULE_KEY, all_nodes, op_key
from txcompile.passes.base import TxPass

FUSED, UNFUSED = "fused", "unfused"


@dataclasses.dataclass
class SiteRecord:
    """One site a rule looked at: what it became, or why it stayed as it was."""

    site: str
    rule: str
    status: str  # FUSED / UNFUSED
    op: str | None = None
    reason: str | None = None
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)  # family facts (mask, form, ...)
    score: int = 0  # a near miss: how far the pattern matched (onnxscript's MatchInfo.score); not reported

    def as_dict(self) -> dict[str, Any]:
        return {
            "site": self.site,
            "rule": self.rule,
            "status": self.status,
            "op": self.op,
            "reason": self.reason,
            **self.extra,
        }


@dataclasses.dataclass
class Rewrite:
    """What a rule's rewrite made: the op the site became and the nodes it created."""

    op: str
    nodes: list[ir.Node] = dataclasses.field(default_factory=list)
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)
    rule: str | None = None  # a more precise name than the rule's own (e.g. the layout it chose)


class Rule:
    """A named rewrite: match → check (with a reason) → rewrite.

    ``state`` is what the pass read once for all its rules (shapes, options, shared caches).
    """

    name: ClassVar[str]

    def match(self, model: ir.Model, state: Any) -> Iterable[Any]:
        raise NotImplementedError

    def site_name(self, site: Any) -> str:
        return getattr(site, "name", None) or str(site)

    def check(self, site: Any, state: Any) -> str | None:
        return None

    def rewrite(self, model: ir.Model, site: Any, state: Any) -> Rewrite:
        raise NotImplementedError


class RulePass(TxPass):
    """Applies ``rules`` in order; every site each one matched lands in ``details["sites"]``."""

    rules: ClassVar[tuple[type[Rule], ...]] = ()

    def prepare(self, model: ir.Model) -> Any:
        """What all rules read once per run (default: nothing)."""
        return None

    def finish(self, model: ir.Model, state: Any, records: list[SiteRecord]) -> None:
        """After the last rule: drop what the rewrites left dead."""
        if any(r.status == FUSED for r in records):
            common.RemoveUnusedNodesPass()(model)

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        state = self.prepare(model)
        records: list[SiteRecord] = []
        for rule_class in self.rules:
            rule = rule_class()
            records.extend(apply_rule(self, rule, model, state))
        self.finish(model, state, records)
        fused = sum(r.status == FUSED for r in records)
        self.details.update(
            {"sites": [r.as_dict() for r in records], "fused": fused, "unfused": len(records) - fused}
        )
        return ir.passes.PassResult(model, bool(fused))


def apply_rule(tx_pass: TxPass, rule: Rule, model: ir.Model, state: Any) -> list[SiteRecord]:
    """One rule over the model: a record per matched site; fused sites are tagged and counted."""
    records = []
    for site in list(rule.match(model, state)):
        name = rule.site_name(site)
        reason = rule.check(site, state)
        if reason is not None:
            records.append(SiteRecord(name, rule.name, UNFUSED, reason=reason))
            continue
        done = rule.rewrite(model, site, state)
        label = done.rule or rule.name
        tx_pass.tag(done.nodes, label)
        tx_pass.rule_counts[label] += 1
        records.append(SiteRecord(name, label, FUSED, op=done.op, extra=done.extra))
    return records


class PatternRule:
    """An onnxscript pattern rule under a name: applied by the rewriter, reasons from its tracer."""

    def __init__(self, name: str, rule: pattern.RewriteRule):
        self.name, self.rule = name, rule

    def apply(self, model: ir.Model) -> tuple[int, list[ir.Node]]:
        """(times applied, nodes created)."""
        before = {id(n) for n in all_nodes(model)}
        applied = pattern.RewriteRuleSet([self.rule]).apply_to_model(model)
        created = [n for n in all_nodes(model) if id(n) not in before] if applied else []
        return applied, created

    def near_misses(self, model: ir.Model, complete: bool = False) -> list[SiteRecord]:
        """Sites that matched part of the pattern, with the reason the rest failed (no change).

        ``complete``: only sites that failed the check or matched the pattern's nodes but at most
        one (a shared intermediate, a constant off by a little), not every partial match — a
        rule for ``Add(x, 0)`` would otherwise list every Add.
        """
        tracer = pattern.MatchingTracer()
        pattern.RewriteRuleSet([self.rule]).apply_to_model(model, tracer=tracer)
        target = getattr(self.rule, "_target_pattern", None)
        whole = max(2, target.num_nodes() - 1) if target is not None else 0
        records = []
        for infos in tracer.best_matches_map.values():
            for info in infos:
                if info.status.name == "SUCCESS":
                    continue
                if complete and info.status.name == "NO_MATCH" and len(info.match_result.nodes) < whole:
                    continue
                reason = info.match_result.reason or info.status.name.lower().replace("_", " ")
                site = info.root_node.name or info.root_node.outputs[0].name
                records.append(SiteRecord(site, self.name, UNFUSED, reason=reason, score=info.score()))
        return records


def apply_patterns(
    tx_pass: TxPass, model: ir.Model, rules: Iterable[PatternRule], family: Mapping[str, str] | None = None
) -> list[SiteRecord]:
    """Apply each pattern rule in turn; count and tag what it made under its family name
    (``family`` maps a variant such as ``bias-gelu-2`` to ``bias-gelu``)."""
    records = []
    for rule in rules:
        applied, created = rule.apply(model)
        records += _fused(tx_pass, (family or {}).get(rule.name, rule.name), applied, created)
    if records:  # the rewriter drops the nodes a match replaced, not the constants they read
        common.RemoveUnusedNodesPass()(model)
    return records


def apply_together(
    tx_pass: TxPass, model: ir.Model, rules: Iterable[PatternRule], rounds: int = 8
) -> list[SiteRecord]:
    """All rules in one traversal per round (each node tries each rule in order), rounds until
    none applies: for many small independent rules, one walk of the graph instead of one per
    rule. Counted and tagged per rule like :func:`apply_patterns`."""
    counted = [_Counted(rule) for rule in rules]
    together = pattern.RewriteRuleSet(counted)  # type: ignore[arg-type]  # duck-typed rules
    for _ in range(rounds):
        if not together.apply_to_model(model):
            break
    alive = set(all_nodes(model))
    records = []
    for rule in counted:
        records += _fused(tx_pass, rule.label, rule.applied, [n for n in rule.created if n in alive])
    if records:
        common.RemoveUnusedNodesPass()(model)
    return records


def _fused(tx_pass: TxPass, label: str, applied: int, created: list[ir.Node]) -> list[SiteRecord]:
    """Count ``applied`` rewrites under ``label``, tag the nodes they made, one record per site."""
    if not applied:
        return []
    tx_pass.rule_counts[label] += applied
    for node in created:
        node.metadata_props.setdefault(RULE_KEY, label)
    return [SiteRecord(_node_site(n), label, FUSED, op=op_key(n)) for n in _roots(created)]


class _Counted:
    """An onnxscript rule that counts its rewrites and keeps the nodes they made."""

    def __init__(self, rule: PatternRule):
        self.label, self.rule = rule.name, rule.rule  # onnxscript's own name stays its ``name``
        self.applied, self.created = 0, []

    def __getattr__(self, attr: str):
        return getattr(self.rule, attr)

    def try_rewrite(self, *args, **kwargs):
        delta = self.rule.try_rewrite(*args, **kwargs)
        if delta is not None and kwargs.get("tracer") is None:
            self.applied += 1
            self.created.extend(delta.new_nodes)
        return delta


def _roots(created: list[ir.Node]) -> list[ir.Node]:
    """The created nodes whose outputs leave the rewrite (one per site for fusions)."""
    inside = set(created)

    def leaves(node: ir.Node) -> bool:
        return any(o.is_graph_output() or any(u.node not in inside for u in o.uses()) for o in node.outputs)

    return [n for n in created if leaves(n)] or created[-1:]


def _node_site(node: ir.Node) -> str:
    return node.name or node.outputs[0].name or node.op_type


def counts(records: Iterable[SiteRecord]) -> collections.Counter[str]:
    return collections.Counter(r.rule for r in records if r.status == FUSED)
