"""sparse-matmul: turn sparse weights into the fastest formulation ORT can run.

ORT densifies sparse initializers and its SparseToDenseMatMul is slower than dense, so the
rewrite stays in dense ops: (1) structured — channels that vanished between two layers are
sliced out of both (structured.py); (2) column groups — block-sparse weights become a Gather
plus one batched MatMul (column_groups.py), optionally int8. A layer is rewritten only when the
cost model and then a quick measurement of that layer say it is faster; the report gives
each layer's pattern, the parameters and FLOPs saved and the measured speedup.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import onnx_ir as ir

from txcompile.graph.errors import TxError
from txcompile.passes.base import TxPass
from txcompile.passes.targets import int8_matmul

from . import column_groups, structured, timing
from .linears import find_linears

MIN_SPARSITY = 0.5  # below this, column groups cannot win (break-even is near 70% at bn=32)
MAX_COST = 0.6  # cost model: skip packings estimated at more than this fraction of dense
MIN_SPEEDUP = 1.1  # measured: keep dense unless the sparse form is clearly faster
TOKENS = 128  # rows of X the in-pass measurement uses
DECISIONS = ("measure", "cost", "always")


@dataclasses.dataclass(frozen=True)
class SparseMatMulOptions:
    precision: str | None = None  # int8: column groups with integer products
    sparse_decision: str = "measure"  # measure, always or never rewrite a layer
    threads: int | None = None  # threads the dense-or-sparse timing runs with

    def __post_init__(self) -> None:
        if self.sparse_decision not in DECISIONS:
            choices = ", ".join(DECISIONS)
            raise TxError(f"--sparse-decision {self.sparse_decision!r}: choose one of {choices}")


class SparseMatMul(TxPass):
    name = "sparse-matmul"
    summary = "exploit sparse weights: slice vanished channels, column-group Gather+MatMul (int8 optional)"
    exact = True

    Options = SparseMatMulOptions

    def __init__(self, context=None) -> None:
        super().__init__(context)
        self.int8 = self.options.precision == "int8"
        if self.int8:
            self.exact = False  # int8 products: approximate, error reported
        self.decision = self.options.sparse_decision
        self.threads = self.options.threads
        self.layers: list[dict[str, Any]] = []
        self.shared: dict = {}  # per input value: its transpose (and int8 quantization), built once

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        opsets = dict(model.opset_imports)
        self._structured(graph, opsets)
        self._column_groups(graph, opsets.get("", opsets.get("ai.onnx", 0)))
        self.details = {
            "layers": self.layers,
            "rewritten": sum(1 for layer in self.layers if layer["pattern"] != "dense"),
            "params_saved": sum(layer.get("params_saved", 0) for layer in self.layers),
            "flops_saved_per_token": sum(layer.get("flops_saved_per_token", 0) for layer in self.layers),
            "decision": self.decision,
            "measured_at_tokens": TOKENS,
            "precision": "int8" if self.int8 else "fp32",
        }
        if self.rule_counts["column-groups"]:
            model.opset_imports.setdefault("com.microsoft", 1)  # FusedMatMul
        if self.int8 and self.details["rewritten"]:
            self.details["weight_bits"] = int8_matmul.weight_bits()
            model.metadata_props[int8_matmul.WEIGHT_BITS_KEY] = str(self.details["weight_bits"])
        return ir.passes.PassResult(model, bool(self.rule_counts))

    # -- structured ----------------------------------------------------------------------------

    def _structured(self, graph: ir.Graph, opsets: dict[str, int]) -> None:
        regions, _ = structured.find_regions(graph, find_linears(graph))
        for region in regions:
            unused, silent = structured.dead_channels(region)
            dead = unused | silent
            if _block_sparse_sources(region, ~dead):
                # cutting single columns would scramble the sources' column groups: cut whole groups only
                dead = structured.whole_groups(dead)
            else:
                dead = structured.aligned(dead)
            silent &= dead
            if not dead.any() or dead.all():
                continue
            sink = region.sink.matrix()
            delta = None
            if silent.any():
                at_zero = structured.region_at_zero(region, opsets)
                delta = (at_zero[silent] @ sink[silent].astype(np.float64)).astype(np.float32)
            before = sum(s.shape[0] * s.shape[1] for s in region.sources) + sink.size
            touched = structured.shrink(graph, region, ~dead, "sparse")
            if delta is not None and np.any(delta != 0):
                touched.append(structured.add_after(graph, region.sink.node, delta, "sparse_dead_channels"))
            self.tag(touched, "structured-channels")
            self.rule_counts["structured-channels"] += 1
            kept = int((~dead).sum())
            after = sum(s.shape[0] for s in region.sources) * kept + kept * sink.shape[1]
            self.layers.append(
                {
                    "layer": region.sink.name,
                    "sources": [s.name for s in region.sources],
                    "pattern": f"structured: {region.channels} -> {kept} channels",
                    "params_saved": int(before - after),
                    "flops_saved_per_token": int(2 * (before - after)),
                    "measured_speedup": None,
                    "note": f"GEMM work shrinks in proportion; folded constant channels: {int(silent.sum())}",
                }
            )

    # -- column groups ---------------------------------------------------------------------------

    def _column_groups(self, graph: ir.Graph, opset: int) -> None:
        rule = "column-groups-int8" if self.int8 else "column-groups"
        linears = find_linears(graph)
        plans = {}
        for linear in linears:
            groups, entry = self._decide(linear, opset)
            self.layers.append(entry)
            if groups is not None:
                plans[id(linear.node)] = (linear, groups, entry)
        regions, _ = structured.find_regions(graph, linears)
        for region in regions:
            if _chainable(region, plans):
                self._rewrite_chain(graph, region, plans, rule)
        for linear, groups, entry in plans.values():
            self._rewrite(graph, linear, groups, rule, entry)

    def _decide(self, linear, opset: int):
        """(packing, report entry): the packing when the column-group form should replace the layer."""
        weight = linear.matrix()
        k, n = weight.shape
        entry: dict[str, Any] = {"layer": linear.name, "shape": [k, n], "pattern": "dense"}
        sparsity = float((weight == 0).mean())
        entry["sparsity"] = round(sparsity, 4)
        reason = self._skip_reason(linear, weight, sparsity, opset)
        if reason:
            entry["reason"] = reason
            return None, entry
        groups = column_groups.best_packing(weight)
        if groups is None:
            entry["reason"] = f"no group width divides N={n}"
            return None, entry
        cost = column_groups.estimated_cost(groups)
        entry["candidate"] = groups.describe()
        if self.decision != "always" and cost > MAX_COST:
            entry["reason"] = f"cost model: {groups.describe()} estimated at {cost:.0%} of dense"
            return None, entry
        if self.decision == "measure":
            measured = timing.measure_groups(
                weight, groups, TOKENS, self.int8, self.threads, self.context.device
            )
            entry["measured_speedup"] = round(measured, 2)
            if measured < MIN_SPEEDUP:
                entry["reason"] = f"measured {measured:.2f}x at M={TOKENS}: dense is as fast"
                return None, entry
        return groups, entry

    def _rewrite_chain(self, graph: ir.Graph, region, plans: dict, rule: str) -> None:
        """Sources, the elementwise ops and the sink all in the transposed [channels, M] layout:
        the sources skip their output transpose and the sink its input transpose."""
        x = region.sources[0].node.inputs[0]
        rank = len(x.shape) if x.shape is not None else None
        for source in region.sources:
            _, groups, entry = plans.pop(id(source.node))
            self._rewrite(graph, source, groups, rule, entry, transposed_out=True)
        channels = region.channels
        for node in region.nodes:
            for slot, operand in enumerate(node.inputs):
                if operand is None or operand.const_value is None:
                    continue
                array = operand.const_value.numpy()
                if array.ndim and array.shape[-1] == channels and channels != 1:
                    column = ir.Value(
                        name=structured.fresh_name(graph, f"{operand.name}_column"),
                        const_value=ir.tensor(np.ascontiguousarray(array.reshape(channels, 1))),
                    )
                    column.shape, column.type = ir.Shape([channels, 1]), operand.type
                    graph.register_initializer(column)
                    node.replace_input_with(slot, column)
            for out in node.outputs:
                out.shape = None
        sink, groups, entry = plans.pop(id(region.sink.node))
        self._rewrite(graph, sink, groups, rule, entry, transposed_in=True, like=x, rank=rank)
        self.rule_counts["transposed-chain"] += 1
        entry["chain"] = [s.name for s in region.sources]

    def _skip_reason(self, linear, weight: np.ndarray, sparsity: float, opset: int) -> str | None:
        if sparsity < MIN_SPARSITY:
            return f"only {sparsity:.0%} zeros"
        if weight.dtype != np.float32:
            return f"{weight.dtype} weights: only float32 is rewritten"
        if opset < 15:
            return f"opset {opset} < 15 (needs Shape with end)"
        x = linear.node.inputs[0]
        if x.shape is not None and len(x.shape) < 2:
            return "input of rank < 2"
        return None

    def _rewrite(self, graph: ir.Graph, linear, groups, rule: str, entry: dict[str, Any], **layout) -> None:
        node = linear.node
        x = node.inputs[0]
        rank = layout.pop("rank") if "rank" in layout else (len(x.shape) if x.shape is not None else None)
        tape = ir.tape.Tape()
        prefix = _unique_prefix(graph, f"sparse_{linear.name}")
        out, info = column_groups.emit(
            tape, x, groups, prefix, rank, int8=self.int8, shared=self.shared, **layout
        )
        if linear.is_gemm and len(node.inputs) > 2 and node.inputs[2] is not None:
            out = tape.op("Add", [out, node.inputs[2]])
        for value in tape.initializers:
            graph.register_initializer(value)
        graph.insert_before(node, tape.nodes)
        old = node.outputs[0]
        out.type, out.shape = old.type, None if layout.get("transposed_out") else old.shape
        was_output, name = old.is_graph_output(), old.name
        ir.convenience.replace_all_uses_with(old, out, replace_graph_outputs=True)
        graph.remove(node, safe=True)
        if was_output:
            out.name = name
        if not list(linear.weight.uses()) and not linear.weight.is_graph_output():
            graph.initializers.pop(linear.weight.name, None)
        self.tag(tape.nodes, rule)
        self.rule_counts[rule] += 1
        k, n = groups.k, groups.n
        kept = groups.groups * groups.cols * groups.width
        entry.update(
            pattern=groups.describe() + (", int8" if self.int8 else ""),
            params_saved=int(k * n - kept),
            flops_saved_per_token=int(2 * (k * n - kept)),
            **info,
        )
        entry.pop("reason", None)


def _chainable(region, plans: dict) -> bool:
    """All of the region's layers go column-group, read one input, and the ops between are plain ONNX
    (contrib ops such as BiasGelu broadcast over the last axis and would not follow the transpose)."""
    layers = [*region.sources, region.sink]
    if any(id(layer.node) not in plans or layer.is_gemm for layer in layers):
        return False
    if len({id(s.node.inputs[0]) for s in region.sources}) != 1:
        return False
    return all(node.domain in ("", "ai.onnx") for node in region.nodes)


def _block_sparse_sources(region, keep: np.ndarray) -> bool:
    """Whether a source stays sparse enough, beyond the dead channels, for column groups."""
    for source in region.sources:
        kept = source.matrix()[:, keep]
        if kept.size and (kept == 0).mean() >= MIN_SPARSITY:
            return True
    return False


def _unique_prefix(graph: ir.Graph, base: str) -> str:
    base = "".join(ch if ch.isalnum() or ch in "_." else "_" for ch in base)
    taken = set(graph.initializers)
    prefix, n = base, 0
    while any(name.startswith(prefix + "_") for name in taken):
        n += 1
        prefix = f"{base}{n}"
    return prefix
