"""The he-contract pass: fail loudly when an op CKKS cannot evaluate touches an encrypted value."""

from __future__ import annotations

import onnx_ir as ir

from txcompile.graph.ckks import ciphertext_values, violations
from txcompile.graph.errors import TxError
from txcompile.passes.base import TxPass


class CheckContract(TxPass):
    name = "he-contract"
    summary = "fail loudly if an op CKKS cannot evaluate touches an encrypted value"

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        problems = violations(model.graph)
        self.details["violations"] = problems
        if problems:
            more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
            raise TxError(f"not HE-evaluable: {problems[0]}{more}")
        self.details["ciphertext_values"] = len(ciphertext_values(model.graph))
        return ir.passes.PassResult(model, False)
