"""What sparse-matmul's rules share in one run: the options, the report entries, and each
layer's decision (dense, or the column-group packing that replaces it).

A layer is decided once, before any column-group rewrite, because a transposed chain needs
to know that every layer in it goes column-group: the cost model first, then (by default) a
quick measurement of that layer alone against dense.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import onnx_ir as ir

from . import column_groups, timing
from .blocks import zero_fraction
from .linears import Linear, find_linears

MIN_SPARSITY = 0.5  # below this, column groups cannot win (break-even is near 70% at bn=32)
MAX_COST = 0.6  # cost model: skip packings estimated at more than this fraction of dense
MIN_SPEEDUP = 1.1  # measured: keep dense unless the sparse form is clearly faster
TOKENS = 128  # rows of X the in-pass measurement uses
DECISIONS = ("measure", "cost", "always")


@dataclasses.dataclass
class SparseState:
    int8: bool = False
    decision: str = "measure"
    threads: int | None = None
    device: str = "cpu"
    opsets: dict[str, int] = dataclasses.field(default_factory=dict)
    layers: list[dict[str, Any]] = dataclasses.field(default_factory=list)  # details["layers"]
    # filled by decide_all: per layer node (by id) its report entry, and the packing when it goes sparse
    linears: list[Linear] | None = None
    entries: dict[int, dict[str, Any]] = dataclasses.field(default_factory=dict)
    plans: dict[int, column_groups.ColumnGroups] = dataclasses.field(default_factory=dict)
    chained: list[Linear] = dataclasses.field(default_factory=list)  # rewritten first, in this order
    layout: dict[int, dict[str, Any]] = dataclasses.field(default_factory=dict)  # chain layouts
    chains: dict[int, list[str]] = dataclasses.field(default_factory=dict)  # chain sink -> its sources
    shared: dict = dataclasses.field(default_factory=dict)  # per input: its transpose (and int8 form)

    @property
    def opset(self) -> int:
        return self.opsets.get("", self.opsets.get("ai.onnx", 0))

    def decide_all(self, graph: ir.Graph) -> list[Linear]:
        """Decide every linear once (the first caller does it); their entries join the report."""
        if self.linears is None:
            self.linears = find_linears(graph)
            for linear in self.linears:
                groups, entry = decide(linear, self)
                self.layers.append(entry)
                self.entries[id(linear.node)] = entry
                if groups is not None:
                    self.plans[id(linear.node)] = groups
        return self.linears


def decide(linear: Linear, state: SparseState) -> tuple[column_groups.ColumnGroups | None, dict[str, Any]]:
    """(packing, report entry): the packing when the column-group form should replace the layer."""
    weight = linear.matrix()
    k, n = weight.shape
    entry: dict[str, Any] = {"layer": linear.name, "shape": [k, n], "pattern": "dense"}
    sparsity = zero_fraction(weight)
    entry["sparsity"] = round(sparsity, 4)
    reason = skip_reason(linear, weight, sparsity, state.opset)
    if reason:
        entry["reason"] = reason
        return None, entry
    groups = column_groups.best_packing(weight)
    if groups is None:
        entry["reason"] = f"no group width divides N={n}"
        return None, entry
    cost = column_groups.estimated_cost(groups)
    entry["candidate"] = groups.describe()
    if state.decision != "always" and cost > MAX_COST:
        entry["reason"] = f"cost model: {groups.describe()} estimated at {cost:.0%} of dense"
        return None, entry
    if state.decision == "measure":
        measured = timing.measure_groups(weight, groups, TOKENS, state.int8, state.threads, state.device)
        entry["measured_speedup"] = round(measured, 2)
        if measured < MIN_SPEEDUP:
            entry["reason"] = f"measured {measured:.2f}x at M={TOKENS}: dense is as fast"
            return None, entry
    return groups, entry


def skip_reason(linear: Linear, weight: np.ndarray, sparsity: float, opset: int) -> str | None:
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
