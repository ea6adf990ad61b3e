"""Kernel check: every op the pipeline emits must have a kernel on the target at its dtype.

ONNX Runtime loads a graph with an op it has no CUDA kernel for and silently runs that op on
the CPU (two copies per call); on the CPU a missing kernel fails the load. Rewrites that are
right for one provider (GroupQueryAttention, BiasSoftmax, fp16 MatMul) are wrong for another,
so the last pass of every pipeline checks the graph against txcompile.graph.kernels and reports
each op that would fall back, with the reason. It changes nothing.
"""

from __future__ import annotations

import collections

import onnx_ir as ir

from txcompile.graph import kernels
from txcompile.graph.nodes import op_key
from txcompile.passes.base import TxPass
from txcompile.passes.rules import UNFUSED, SiteRecord

NO_KERNEL = "no-kernel"
SKIPPED = {("ai.onnx", "Constant")}  # ORT turns these into initializers; no kernel runs
LISTED = 50
CONSEQUENCE = {
    "CUDAExecutionProvider": "fall back to the CPU (copies on every call)",
    "CPUExecutionProvider": "fail to load (float16 ones run in fp32 between Casts ORT inserts)",
}  # sites listed one by one in the report; the rest are counted


def value_dtypes(model: ir.Model) -> dict[ir.Value, str]:
    """The dtype of every value we can know: its IR type, else what the op's schema implies."""
    known: dict[ir.Value, str] = {}

    def note(value: ir.Value | None, dtype: str | None = None) -> None:
        if value is None or value in known:
            return
        if value.dtype is not None:
            known[value] = value.dtype.name.lower()
        elif dtype:
            known[value] = dtype

    for value in [*model.graph.inputs, *model.graph.initializers.values()]:
        note(value)
    opsets = model.opset_imports
    for node in ir.traversal.RecursiveGraphIterator(model.graph):
        for value in node.inputs:
            note(value)
        schema = kernels.schema_for(node.domain, node.op_type, _version(opsets, node.domain))
        implied = [None] * len(node.outputs)
        if schema is not None:
            attrs = {name: attr.value for name, attr in node.attributes.items()}
            implied = kernels.output_types(
                schema,
                attrs,
                [known.get(v) if v is not None else None for v in node.inputs],
                len(node.outputs),
            )
        for value, dtype in zip(node.outputs, implied, strict=True):
            note(value, dtype)
    return known


def _version(opsets: dict[str, int], domain: str) -> int:
    if domain in ("", "ai.onnx"):
        return opsets.get("", opsets.get("ai.onnx", 1))
    return opsets.get(domain, 1)


def missing_kernels(model: ir.Model, table: kernels.KernelTable) -> tuple[int, list[dict]]:
    """(nodes checked, one site record per node without a kernel on the table's provider: the
    shared keys — site, rule, status, op, reason — plus the opset and the bound types)."""
    dtypes = value_dtypes(model)
    local_functions = {(f.domain, f.name) for f in model.functions.values()}
    checked, missing = 0, []
    for node in ir.traversal.RecursiveGraphIterator(model.graph):
        domain = kernels._domain(node.domain)
        if (domain, node.op_type) in SKIPPED or (node.domain, node.op_type) in local_functions:
            continue
        checked += 1
        version = _version(model.opset_imports, node.domain)
        schema = kernels.schema_for(node.domain, node.op_type, version)
        inputs = [dtypes.get(v) if v is not None else None for v in node.inputs]
        outputs = [dtypes.get(v) for v in node.outputs]
        binding = kernels.bind(schema, inputs, outputs) if schema is not None else {}
        reason = table.why_not(node.domain, node.op_type, version, binding)
        if reason:
            site = node.name or node.outputs[0].name or node.op_type
            extra = {"opset": version, "types": binding}
            missing.append(SiteRecord(site, NO_KERNEL, UNFUSED, op=op_key(node), reason=reason, extra=extra))
    return checked, [m.as_dict() for m in missing]


class KernelCheck(TxPass):
    name = "kernel-check"
    summary = "check that every op has a kernel on the target at its dtype; report fallbacks"

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        table = kernels.table_for(self.context.device)
        checked, missing = missing_kernels(model, table)
        by_reason = collections.Counter(m["reason"] for m in missing)
        self.details = {
            "provider": table.provider,
            "table": table.source,
            "checked": checked,
            "missing": len(missing),
            "consequence": CONSEQUENCE.get(table.provider, "cannot run there"),
            "reasons": dict(by_reason.most_common()),
            "sites": missing[:LISTED],
        }
        if missing:
            self.rule_counts[NO_KERNEL] = len(missing)
        return ir.passes.PassResult(model, False)
