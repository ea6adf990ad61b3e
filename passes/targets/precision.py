"""Precision: run the graph in fp16 or bf16 where the target has kernels and numerics allow.

GPUs are fast in half precision; the CUDA EP has fp16 kernels for nearly every transformer op.
Each node is decided in graph order against the target's kernel table (txcompile.graph.kernels), so
an op with no half-precision kernel there stays fp32 instead of falling back or failing:

- ops whose numerics need fp32 (powers, reductions, square roots, exp/log, cos/sin of RoPE
  angles) stay fp32, and so does every node fed only by such fp32 work (the RMSNorm variance
  chain, the rotary-angle MatMul, the attention-mask arithmetic), until it meets a
  half-precision value;
- inputs a schema fixes at ``tensor(float)`` (Resize scales, ...) stay fp32;
- float weights are stored once per precision they are used in, clipped to fp16's range;
- Casts are inserted where the two regions meet, once per value; graph inputs and outputs
  stay fp32 unless ``--low-precision-io``.

Approximate: the pass manager reports the drift against the fp32 graph.
"""

from __future__ import annotations

import dataclasses

import onnx_ir as ir

from txcompile.graph import kernels
from txcompile.graph.errors import TxError
from txcompile.passes.base import TxPass
from txcompile.passes.targets.precision_plan import KEEP_FP32, TYPED_BY_ATTRIBUTE, PrecisionPlan
from txcompile.passes.targets.precision_rewrite import LowPrecisionRewrite

__all__ = ["CHOICES", "KEEP_FP32", "LOW", "TYPED_BY_ATTRIBUTE", "Precision", "requested_precision"]

LOW = {"fp16": ir.DataType.FLOAT16, "bf16": ir.DataType.BFLOAT16}
CHOICES = ("fp32", "fp16", "bf16", "int8", "int4")
DEFAULT_PRECISION = {"cpu": "fp32", "gpu": "fp16"}


def requested_precision(asked: str | None, target: str) -> str:
    """The precision the user asked for, or the target's default; bad combinations exit 2."""
    precision = asked or DEFAULT_PRECISION.get(target, "fp32")
    if precision not in CHOICES:
        raise TxError(f"--precision {precision}: choose one of {', '.join(CHOICES)}")
    if precision == "int8" and target != "cpu":
        raise TxError("--precision int8 is for --target cpu (dynamic int8 MatMul kernels are CPU-only)")
    return precision


@dataclasses.dataclass(frozen=True)
class PrecisionOptions:
    precision: str | None = None  # None: the target's default
    low_precision_io: bool = False  # graph inputs/outputs in fp16/bf16 too


class Precision(TxPass):
    name = "precision"
    summary = "fp16/bf16 where the target has kernels and numerics allow; fp32 graph inputs/outputs"
    exact = False
    Options = PrecisionOptions

    def __init__(self, context=None) -> None:
        super().__init__(context)
        self.precision = requested_precision(self.options.precision, self.context.target)

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        if self.precision not in LOW:
            self.details = {"precision": self.precision, "note": "nothing to do at this precision"}
            return ir.passes.PassResult(model, False)
        table = kernels.table_for(self.context.device)
        plan = PrecisionPlan(model, LOW[self.precision], table, keep_io=not self.options.low_precision_io)
        plan.decide_all()
        rewrite = LowPrecisionRewrite(plan)
        rewrite.apply()
        self.tag(rewrite.casts, "insert-cast")
        self.rule_counts.update(rewrite.counts)
        self.details = {
            "precision": self.precision,
            "kernels": table.provider,
            "low_ops": dict(sorted(plan.low_ops.items())),
            "kept_fp32": {op: dict(reasons) for op, reasons in sorted(plan.kept.items())},
            "casts": len(rewrite.casts),
            "io": "fp32" if plan.keep_io else self.precision,
        }
        return ir.passes.PassResult(model, bool(plan.low_ops))
