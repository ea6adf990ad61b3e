"""The polynomial form of a transformer: every non-linearity on encrypted data becomes + and ×.

Per site: calibrate the input range (``--calib`` inputs, else the verification inputs), widen
it by the margin, fit the cheapest polynomial scheme meeting the tolerance, emit it as plain
ONNX ops (pre-scaling folded into the producing linear layer where possible) and report degree,
depth, max error on the domain and the out-of-range rate on held-out inputs.

Each kind of site is a rule (see ``__init__``). Sites are rewritten in graph order, not rule by
rule: a site's pre-scaling folds through the rewrites upstream of it, and its levels are
counted on them.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import onnx_ir as ir
import onnx_ir.passes.common as common

from txcompile.graph.ckks import ciphertext_values, violations
from txcompile.graph.errors import TxError
from txcompile.passes.rules import FUSED, UNFUSED, RulePass, SiteRecord

from . import calibrate, prepare
from .elementwise import ElementwiseRule
from .feeds import feed_sets
from .inverses import InvSqrtRule, ReciprocalRule, SqrtRule
from .layernorm import LayerNormRule
from .power_softmax import PowerSoftmaxRule
from .site_rule import SiteRule
from .sites import Site, find_sites
from .softmax import SoftmaxRule
from .state import PolyState

MODES = ("approx", "power-softmax")


@dataclasses.dataclass(frozen=True)
class PolynomialOptions:
    he_mode: str = "approx"  # approx, or power-softmax (softmax replaced by a normalized power)
    he_margin: float = 1.5  # fit each polynomial over the calibrated range widened by this factor
    he_tol: float = 1e-3
    he_power: int = 4
    calib: str | None = None

    def __post_init__(self) -> None:
        if self.he_mode not in MODES:
            raise TxError(f"--he-mode {self.he_mode!r}: choose approx or power-softmax")
        if self.he_margin < 1 or self.he_tol <= 0 or self.he_power < 2 or self.he_power % 2:
            raise TxError("--he-margin must be ≥ 1, --he-tol > 0 and --he-power an even integer ≥ 2")


class PolynomialForm(RulePass):
    name = "he-polynomial"
    summary = "replace every non-linearity on encrypted values by a calibrated polynomial scheme"
    exact = False
    Options = PolynomialOptions
    rules = (
        ElementwiseRule,
        SoftmaxRule,
        PowerSoftmaxRule,
        LayerNormRule,
        InvSqrtRule,
        SqrtRule,
        ReciprocalRule,
    )

    def prepare(self, model: ir.Model) -> PolyState:
        """Normalize the graph (counted: nan-guard, div-by-constant, patch-conv), find the
        sites, calibrate the encrypted ones."""
        options, graph = self.options, model.graph
        self.rule_counts["nan-guard"] += prepare.remove_nan_guards(graph)
        self.rule_counts["div-by-constant"] += prepare.div_by_constant(graph)
        self.rule_counts["patch-conv"] += prepare.patch_conv_to_matmul(graph)
        common.RemoveUnusedNodesPass()(model)
        prepare.name_values(graph)
        encrypted = ciphertext_values(graph)
        sites = find_sites(graph, encrypted)
        names = [s.value.name for s in sites if s.encrypted]
        calib_feeds, heldout_feeds = feed_sets(model, self.context.feeds, options.calib)
        calib = calibrate.capture(model, names, calib_feeds) if names else {}
        heldout = calibrate.capture(model, names, heldout_feeds) if names else {}
        mode, margin, tol, power = options.he_mode, options.he_margin, options.he_tol, options.he_power
        return PolyState(graph, encrypted, sites, calib, heldout, mode, float(margin), float(tol), int(power))

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        state = self.prepare(model)
        order = {id(site): i for i, site in enumerate(state.sites)}
        queue = [(site, rule) for rule in (r() for r in self.rules) for site in rule.match(model, state)]
        queue.sort(key=lambda pair: order[id(pair[0])])
        records = [self._apply(model, rule, site, state) for site, rule in queue]
        self.rule_counts = +self.rule_counts
        fused = [r for r in records if r.status == FUSED]
        self.details.update(_summary(fused), mode=state.mode, margin=state.margin, tolerance=state.tol)
        self.details.update(
            sites=[r.as_dict() for r in records], fused=len(fused), unfused=len(records) - len(fused)
        )
        self.details["unsupported"] = violations(model.graph)
        return ir.passes.PassResult(model, bool(fused) or bool(self.rule_counts))

    def _apply(self, model: ir.Model, rule: SiteRule, site: Site, state: PolyState) -> SiteRecord:
        """One site: refresh, check (plaintext: unfused; contract: TxError), rewrite, tag, count."""
        name = rule.site_name(site)
        state.refresh(site)
        reason = rule.check(site, state)
        if reason is not None:
            return SiteRecord(name, rule.label(site), UNFUSED, reason=reason, extra={"kind": rule.kind(site)})
        done = rule.rewrite(model, site, state)
        self.tag(done.nodes, done.rule)
        self.rule_counts[done.rule] += 1
        common.RemoveUnusedNodesPass()(model)  # dead copies must not count as users of what they read
        return SiteRecord(name, done.rule, FUSED, op=done.op, extra=done.extra)


def _summary(records: list[SiteRecord]) -> dict[str, Any]:
    """The deepest site per non-linearity (what the terminal report shows)."""
    worst: dict[str, dict] = {}
    for facts in (r.extra for r in records):
        kind = facts["kind"]
        if kind not in worst or facts["depth"] > worst[kind]["depth"]:
            worst[kind] = {key: facts[key] for key in ("depth", "degree", "max_error")}
    return {"per_nonlinearity": worst}
