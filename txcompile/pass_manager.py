"""The instrumented pass manager: run, measure, verify, and roll back what breaks.

The pipeline holds one IR model. Each pass runs on a clone of the last accepted one (nodes
and values copied, tensors shared, so a rollback is dropping the clone); the manager times
it, counts what it added and removed, tags the new nodes, and hands the candidate, as a
proto whose weights live in the run's workspace (graph/workspace.py), to its instruments
(instruments.py): the ONNX checker, then — when verifying — an onnxruntime run on the target
device whose outputs an exact pass must match within ``atol``. A veto rolls the pass back
and the report says why, so the final model always loads and runs.
"""

from __future__ import annotations

import collections
import dataclasses
import time
import traceback
from collections.abc import Sequence
from typing import Any

import numpy as np
import onnx
import onnx_ir as ir

from txcompile.graph import progress, workspace
from txcompile.graph.errors import TxError, one_line
from txcompile.graph.nodes import PASS_KEY, RULE_KEY, all_nodes, op_key
from txcompile.instruments import Instrument, NumericDrift, OnnxChecker
from txcompile.passes.base import TxPass

APPLIED, UNCHANGED, ROLLED_BACK = "applied", "unchanged", "rolled back"


@dataclasses.dataclass
class PassRecord:
    name: str
    summary: str
    exact: bool
    status: str = UNCHANGED
    reason: str | None = None
    seconds: float = 0.0
    nodes_before: int = 0
    nodes_after: int = 0
    nodes_added: int = 0
    nodes_removed: int = 0
    op_delta: dict[str, int] = dataclasses.field(default_factory=dict)
    rule_counts: dict[str, int] = dataclasses.field(default_factory=dict)
    max_diff: float | None = None
    details: dict[str, Any] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class PipelineResult:
    ir_model: ir.Model  # the final model; its weights may live in the run's workspace
    records: list[PassRecord]
    reference_outputs: dict[str, np.ndarray] | None
    final_outputs: dict[str, np.ndarray] | None
    source: onnx.ModelProto | ir.Model | None = None
    _proto: onnx.ModelProto | None = dataclasses.field(default=None, repr=False)

    @property
    def exact(self) -> bool:
        return all(r.exact for r in self.records if r.status == APPLIED)

    @property
    def model(self) -> onnx.ModelProto:
        """The final model as a stand-alone proto, weights in memory (the input proto itself
        when no pass applied)."""
        if self._proto is None:
            unchanged = all(r.status != APPLIED for r in self.records)
            if unchanged and isinstance(self.source, onnx.ModelProto):
                self._proto = self.source
            else:
                self._proto = workspace.standalone_proto(self.ir_model)
        return self._proto


class PassManager:
    def __init__(
        self,
        passes: Sequence[TxPass],
        *,
        device: str = "cpu",
        atol: float = 1e-4,
        verify: bool = True,
        debug: bool = False,
        instruments: Sequence[Instrument] = (),
    ) -> None:
        self.passes = list(passes)
        self.device = device
        self.atol = atol
        self.verify = verify
        self.debug = debug
        self.extra_instruments = list(instruments)

    def run(self, model: onnx.ModelProto | ir.Model, feeds: dict[str, np.ndarray]) -> PipelineResult:
        """Inside an active workspace the result's weights stay there (the caller writes the
        model before leaving it); otherwise the run has its own, and the result's weights are
        read into memory before it is removed."""
        active = workspace.current()
        if active is not None:
            return self._run(model, feeds, active)
        with workspace.Workspace() as own:
            result = self._run(model, feeds, own)
            result.ir_model = workspace.in_memory(result.ir_model)  # read before the folder goes
            return result

    def _run(self, source, feeds, space: workspace.Workspace) -> PipelineResult:
        model = source.clone() if isinstance(source, ir.Model) else ir.serde.deserialize_model(source)
        proto = space.proto(model)
        drift = NumericDrift(feeds, self.device, self.atol) if self.verify else None
        instruments = [OnnxChecker(), *([drift] if drift else []), *self.extra_instruments]
        for instrument in instruments:
            instrument.start(proto)
        records = []
        with progress.step("passes", total=len(self.passes)) as now:
            for tx_pass in self.passes:
                now(tx_pass.name)
                record, candidate = self._run_one(tx_pass, model, instruments, space)
                records.append(record)
                if record.status == APPLIED:
                    model = candidate
                    for instrument in instruments:
                        instrument.accept()
                space.trim(model)  # the weight pages this pass and its checks read
        reference, outputs = (drift.reference, drift.outputs) if drift else (None, None)
        return PipelineResult(model, records, reference, outputs, source)

    def _run_one(self, tx_pass: TxPass, model: ir.Model, instruments: list[Instrument], space):
        record = PassRecord(tx_pass.name, tx_pass.summary, tx_pass.exact)
        working = model.clone()
        before = all_nodes(working)  # the node objects themselves: ids stay unique while held
        interface = [(v.name, v.type, v.shape) for v in working.graph.outputs]
        start = time.perf_counter()
        try:
            result = tx_pass(working)
        except TxError:  # bad input or a contract the user asked for: one line, exit 2
            raise
        except Exception as err:  # a pass that raises is rolled back, never fatal
            record.seconds = time.perf_counter() - start
            return self._rolled_back(record, f"raised {type(err).__name__}: {one_line(err)}", err), None
        record.seconds = time.perf_counter() - start
        record.rule_counts = dict(tx_pass.rule_counts)
        record.details = tx_pass.details
        after = all_nodes(result.model)
        record.nodes_before, record.nodes_after = len(before), len(after)
        added, removed = _node_delta(before, after)
        record.nodes_added, record.nodes_removed = len(added), len(removed)
        record.op_delta = _op_delta([op_key(n) for n in removed], [op_key(n) for n in added])
        if not result.modified and not added and not removed:
            return record, None
        for node in added:
            node.metadata_props.setdefault(PASS_KEY, tx_pass.name)
            node.metadata_props.setdefault(RULE_KEY, tx_pass.name)
        _keep_interface(result.model.graph, interface)
        candidate = space.proto(result.model)
        space.trim(model, result.model)  # the weights the pass read: its checks need other pages
        for instrument in instruments:
            problem = instrument.after(candidate, tx_pass.exact, record)
            if problem:
                return self._rolled_back(record, problem), None
        record.status = APPLIED
        return record, result.model

    def _rolled_back(self, record: PassRecord, reason: str, err: BaseException | None = None):
        record.status = ROLLED_BACK
        record.reason = reason
        record.op_delta = {}
        if self.debug and err is not None:
            traceback.print_exception(err)
        return record


def _keep_interface(graph: ir.Graph, interface: list) -> None:
    """Graph outputs keep their names, types and shapes when a pass replaced the value behind them."""
    if len(graph.outputs) != len(interface):
        return
    taken = {v.name for v in graph.inputs} | set(graph.initializers)
    taken |= {v.name for node in graph for v in node.outputs}
    for value, (name, type_, shape) in zip(graph.outputs, interface, strict=True):
        if value.name != name and name not in taken and not value.is_graph_input():
            value.name = name
        if value.type is None:
            value.type = type_
        if value.shape is None:
            value.shape = shape


def _op_delta(removed: list[str], added: list[str]) -> dict[str, int]:
    delta: dict[str, int] = {}
    for op in removed:
        delta[op] = delta.get(op, 0) - 1
    for op in added:
        delta[op] = delta.get(op, 0) + 1
    return {op: n for op, n in sorted(delta.items()) if n}


def _node_delta(before: list[ir.Node], after: list[ir.Node]) -> tuple[list[ir.Node], list[ir.Node]]:
    """(added, removed): a node counts as kept when the same object is still there, or failing
    that a node with the same name and op (passes that rebuild the graph, like quantize, keep the
    names of what they did not touch)."""
    before_ids, after_ids = {id(n) for n in before}, {id(n) for n in after}
    gone = [n for n in before if id(n) not in after_ids]
    new = [n for n in after if id(n) not in before_ids]
    old_names = collections.Counter((n.name, op_key(n)) for n in gone if n.name)
    new_names = collections.Counter((n.name, op_key(n)) for n in new if n.name)
    same = old_names & new_names  # rebuilt under the same name and op: not a change
    return _minus(new, same.copy()), _minus(gone, same.copy())


def _minus(nodes: list[ir.Node], same: collections.Counter) -> list[ir.Node]:
    kept = []
    for node in nodes:
        key = (node.name, op_key(node))
        if node.name and same[key] > 0:
            same[key] -= 1
        else:
            kept.append(node)
    return kept
