"""sparse-matmul: turn sparse weights into the fastest formulation ORT can run.

ORT densifies sparse initializers and its SparseToDenseMatMul is slower than dense, so the
rewrite stays in dense ops: (1) structured — channels that vanished between two layers are
sliced out of both (structured.py); (2) column groups — block-sparse weights become a Gather
plus one batched MatMul (column_groups.py), optionally int8. A layer is rewritten only when the
cost model and then a quick measurement of that layer say it is faster; the report gives
each layer's pattern, the parameters and FLOPs saved and the measured speedup. The rules are
in sparse_rules.py, the per-layer decision in sparse_state.py.
"""

from __future__ import annotations

import dataclasses

import onnx_ir as ir

from txcompile.graph.errors import TxError
from txcompile.graph.nodes import MS_DOMAIN
from txcompile.passes.rules import RulePass, SiteRecord
from txcompile.passes.targets import int8_matmul

from .sparse_rules import ColumnGroupsRule, StructuredChannelsRule, TransposedChainRule
from .sparse_state import DECISIONS, MAX_COST, MIN_SPARSITY, MIN_SPEEDUP, TOKENS, SparseState

__all__ = ["MAX_COST", "MIN_SPARSITY", "MIN_SPEEDUP", "TOKENS", "SparseMatMul", "SparseMatMulOptions"]


@dataclasses.dataclass(frozen=True)
class SparseMatMulOptions:
    precision: str | None = None  # int8: column groups with integer products
    sparse_decision: str = "measure"  # measure, always or never rewrite a layer
    threads: int | None = None  # threads the dense-or-sparse timing runs with (API only: no CLI flag)

    def __post_init__(self) -> None:
        if self.sparse_decision not in DECISIONS:
            choices = ", ".join(DECISIONS)
            raise TxError(f"--sparse-decision {self.sparse_decision!r}: choose one of {choices}")


class SparseMatMul(RulePass):
    name = "sparse-matmul"
    summary = "exploit sparse weights: slice vanished channels, column-group Gather+MatMul (int8 optional)"
    exact = True
    Options = SparseMatMulOptions
    rules = (StructuredChannelsRule, TransposedChainRule, ColumnGroupsRule)

    def __init__(self, context=None) -> None:
        super().__init__(context)
        self.int8 = self.options.precision == "int8"
        if self.int8:
            self.exact = False  # int8 products: approximate, error reported

    def prepare(self, model: ir.Model) -> SparseState:
        options = self.options
        return SparseState(
            int8=self.int8,
            decision=options.sparse_decision,
            threads=options.threads,
            device=self.context.device,
            opsets=dict(model.opset_imports),
        )

    def finish(self, model: ir.Model, state: SparseState, records: list[SiteRecord]) -> None:
        """The per-layer report; no dead-code sweep (each rewrite removes what it replaced)."""
        layers = state.layers
        if "transposed-chain" in self.rule_counts:  # listed after the layers it joined, as before
            self.rule_counts["transposed-chain"] = self.rule_counts.pop("transposed-chain")
        self.details = {
            "layers": layers,
            "rewritten": sum(1 for layer in layers if layer["pattern"] != "dense"),
            "params_saved": sum(layer.get("params_saved", 0) for layer in layers),
            "flops_saved_per_token": sum(layer.get("flops_saved_per_token", 0) for layer in layers),
            "decision": state.decision,
            "measured_at_tokens": TOKENS,
            "precision": "int8" if self.int8 else "fp32",
        }
        if self.rule_counts["column-groups"]:
            model.opset_imports.setdefault(MS_DOMAIN, 1)  # FusedMatMul
        if self.int8 and self.details["rewritten"]:
            self.details["weight_bits"] = int8_matmul.weight_bits()
            model.metadata_props[int8_matmul.WEIGHT_BITS_KEY] = str(self.details["weight_bits"])
