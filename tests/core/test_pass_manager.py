"""The pass manager keeps what verifies and rolls back what breaks, saying why."""

import numpy as np
import onnx_ir as ir

from txcompile.graph import ort as rt
from txcompile.graph.nodes import PASS_KEY, RULE_KEY
from txcompile.instruments import Instrument
from txcompile.pass_manager import APPLIED, ROLLED_BACK, UNCHANGED, PassManager
from txcompile.passes.base import PassContext, TxPass

FEEDS = {"x": np.random.default_rng(1).standard_normal((3, 8)).astype(np.float32)}


def _node(model: ir.Model, name: str) -> ir.Node:
    return next(n for n in model.graph if n.name == name)


class ReluToAbs(TxPass):
    """Deliberately wrong: Relu and Abs differ on negative inputs."""

    name = "relu-to-abs"
    summary = "wrong on purpose"

    def call(self, model):
        relu = _node(model, "relu")
        new = ir.node("Abs", [relu.inputs[0]], name="abs")
        self.tag([new], "relu-to-abs")
        model.graph.insert_after(relu, new)
        relu.outputs[0].replace_all_uses_with(new.outputs[0], replace_graph_outputs=True)
        model.graph.remove(relu, safe=True)
        self.rule_counts["relu-to-abs"] += 1
        return ir.passes.PassResult(model, True)


class ApproximateReluToAbs(ReluToAbs):
    name = "approx-relu-to-abs"
    exact = False


class Raises(TxPass):
    name = "raises"
    summary = "raises half-way"

    def call(self, model):
        model.graph.remove(_node(model, "relu"))
        raise RuntimeError("boom")


class Dangling(TxPass):
    name = "dangling"
    summary = "leaves a node reading a value nobody produces"

    def call(self, model):
        relu = _node(model, "relu")
        relu.replace_input_with(0, ir.Value(name="nowhere"))
        return ir.passes.PassResult(model, True)


class DoubleRelu(TxPass):
    """Exact: Relu(Relu(x)) == Relu(x)."""

    name = "double-relu"
    summary = "adds a redundant Relu"

    def call(self, model):
        relu = _node(model, "relu")
        new = ir.node("Relu", [relu.outputs[0]], name="relu_again")
        model.graph.insert_after(relu, new)
        model.graph.outputs[0] = new.outputs[0]
        return ir.passes.PassResult(model, True)


class Nothing(TxPass):
    name = "nothing"
    summary = "changes nothing"

    def call(self, model):
        return ir.passes.PassResult(model, False)


def _run(mlp, *passes):
    manager = PassManager([p(PassContext()) for p in passes])
    return manager.run(mlp, FEEDS)


def test_wrong_exact_pass_is_rolled_back(mlp):
    result = _run(mlp, ReluToAbs)
    record = result.records[0]
    assert record.status == ROLLED_BACK
    assert "drifted" in record.reason and record.max_diff > 1e-4
    assert [n.op_type for n in result.model.graph.node].count("Relu") == 1
    assert rt.max_abs_diff(result.final_outputs, result.reference_outputs) == 0


def test_approximate_pass_is_kept_with_its_error(mlp):
    result = _run(mlp, ApproximateReluToAbs)
    record = result.records[0]
    assert record.status == APPLIED and record.max_diff > 1e-4
    assert record.rule_counts == {"relu-to-abs": 1}
    assert record.op_delta == {"Abs": 1, "Relu": -1}
    assert not result.exact
    abs_node = next(n for n in result.model.graph.node if n.op_type == "Abs")
    props = {p.key: p.value for p in abs_node.metadata_props}
    assert props[RULE_KEY] == "relu-to-abs" and props[PASS_KEY] == "approx-relu-to-abs"


def test_raising_pass_is_rolled_back_and_later_passes_still_run(mlp):
    result = _run(mlp, Raises, DoubleRelu)
    assert result.records[0].status == ROLLED_BACK
    assert "RuntimeError: boom" in result.records[0].reason
    assert result.records[1].status == APPLIED
    assert [n.op_type for n in result.model.graph.node].count("Relu") == 2


def test_pass_that_breaks_the_graph_is_rolled_back(mlp):
    result = _run(mlp, Dangling)
    assert result.records[0].status == ROLLED_BACK
    assert "checker" in result.records[0].reason or "cannot run" in result.records[0].reason


def test_exact_pass_applied_and_counted(mlp):
    result = _run(mlp, DoubleRelu)
    record = result.records[0]
    assert record.status == APPLIED and record.max_diff == 0
    assert (record.nodes_before, record.nodes_after, record.nodes_added) == (7, 8, 1)


def test_unchanged_pass_is_not_verified(mlp):
    result = _run(mlp, Nothing)
    assert result.records[0].status == UNCHANGED and result.records[0].max_diff is None
    assert result.model is mlp


class NoAbs(Instrument):
    """A check of one's own: veto any candidate with an Abs node; count the accepted ones."""

    def __init__(self):
        self.accepted = 0

    def after(self, candidate, exact, record):
        return "has an Abs" if any(n.op_type == "Abs" for n in candidate.graph.node) else None

    def accept(self):
        self.accepted += 1


def test_an_added_instrument_vetoes_a_candidate_the_built_in_checks_accept(mlp):
    veto = NoAbs()
    manager = PassManager([ApproximateReluToAbs(PassContext())], instruments=[veto])
    result = manager.run(mlp, FEEDS)
    [record] = result.records
    assert (record.status, record.reason) == (ROLLED_BACK, "has an Abs")
    assert record.max_diff > 1e-4  # the drift check ran first and filled the record
    assert veto.accepted == 0 and "Abs" not in [n.op_type for n in result.model.graph.node]
