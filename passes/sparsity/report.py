"""sparsity-report: per linear weight, how sparse it is and which block structure holds its zeros."""

from __future__ import annotations

import onnx_ir as ir

from txcompile.passes.base import TxPass

from . import blocks
from .linears import find_linears


class SparsityReport(TxPass):
    name = "sparsity-report"
    summary = "per MatMul/Gemm weight: sparsity, dead rows/columns and the best block shape (changes nothing)"

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        layers = []
        for linear in find_linears(model.graph):
            info = blocks.describe(linear.matrix())
            layers.append({"layer": linear.name, "op": linear.node.op_type, "role": linear.role, **info})
        sparse = [layer for layer in layers if layer["sparsity"] > 0]
        total = sum(layer["shape"][0] * layer["shape"][1] for layer in layers)
        zeros = sum(layer["shape"][0] * layer["shape"][1] * layer["sparsity"] for layer in layers)
        self.details = {
            "linears": len(layers),
            "sparse_linears": len(sparse),
            "overall_sparsity": round(zeros / total, 4) if total else 0.0,
            "layers": layers,
        }
        if sparse:
            self.rule_counts["sparse-weights"] = len(sparse)
        return ir.passes.PassResult(model, False)
