"""Analyze: record parameters, the op histogram and FLOPs per op type; changes nothing."""

from __future__ import annotations

import onnx_ir as ir

from txcompile.graph import workspace
from txcompile.graph.nodes import op_histogram
from txcompile.passes.base import TxPass
from txcompile.passes.cleanup import analysis


class Analyze(TxPass):
    name = "analyze"
    summary = "record parameters, op histogram and FLOPs per op type (at the verification shapes)"

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        proto = workspace.serialize(model)
        self.details = {**analysis.parameter_counts(proto), "ops": op_histogram(model)}
        if self.context.feeds:
            flops = analysis.flops_by_op(proto, self.context.feeds)
            self.details["flops_by_op"] = flops
            self.details["flops"] = sum(flops.values())
            self.details["flops_at"] = {k: list(v.shape) for k, v in self.context.feeds.items()}
        return ir.passes.PassResult(model, False)
