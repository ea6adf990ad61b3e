"""The he-depth pass: report the multiplicative depth and CKKS parameters (changes nothing)."""

from __future__ import annotations

import dataclasses

import onnx_ir as ir

from txcompile.graph.depth import depth_report
from txcompile.passes.base import TxPass


@dataclasses.dataclass(frozen=True)
class DepthOptions:
    level_budget: int | None = None  # levels between bootstraps; the report says where they run out


class HeDepth(TxPass):
    name = "he-depth"
    summary = "multiplicative depth, critical path, mult counts and CKKS parameters (no change)"
    Options = DepthOptions

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        budget = self.options.level_budget
        report = depth_report(model, budget)
        report.pop("nodes")
        self.details.update(report)
        self.rule_counts["depth"] = report["depth"]
        return ir.passes.PassResult(model, False)
