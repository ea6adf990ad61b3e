"""Cleanup passes: each removes what it names and nothing else (positive and negative cases)."""

import numpy as np
import onnx_ir as ir
import pytest

from tests.conftest import mlp_model
from txcompile.pass_manager import APPLIED, UNCHANGED, PassManager
from txcompile.passes.base import PassContext
from txcompile.passes.cleanup import simplify as cleanup

FEEDS = {"x": np.random.default_rng(2).standard_normal((4, 8)).astype(np.float32)}


def _apply(pass_cls, model):
    return PassManager([pass_cls(PassContext())]).run(model, FEEDS)


def _ops(model):
    return [n.op_type for n in model.graph.node]


def test_fold_constants_folds_the_constant_add():
    result = _apply(cleanup.FoldConstants, mlp_model())
    assert result.records[0].status == APPLIED
    assert _ops(result.model).count("Add") == 1
    assert result.records[0].rule_counts["folded"] >= 1


def test_simplify_shapes_merges_reshape_chain():
    result = _apply(cleanup.SimplifyShapes, mlp_model())
    assert result.records[0].rule_counts.get("reshape-reshape") == 1
    assert _ops(result.model).count("Reshape") == 1
    assert result.records[0].max_diff == 0


def test_remove_identity():
    result = _apply(cleanup.RemoveIdentity, mlp_model())
    assert "Identity" not in _ops(result.model)
    assert result.records[0].rule_counts == {"identity": 1}


def test_remove_identity_leaves_other_ops_alone():
    result = _apply(cleanup.RemoveIdentity, mlp_model(identity=False))
    assert result.records[0].status == UNCHANGED
    assert "Neg" in _ops(result.model)


def test_cse_merges_duplicates():
    model = ir.serde.deserialize_model(mlp_model())
    relu = next(n for n in model.graph if n.op_type == "Relu")
    twin = ir.node("Relu", [relu.inputs[0]], name="twin")
    model.graph.insert_after(relu, twin)
    total = ir.node("Add", [relu.outputs[0], twin.outputs[0]], name="sum")
    model.graph.insert_after(twin, total)
    total.outputs[0].type, total.outputs[0].shape = relu.outputs[0].type, relu.outputs[0].shape
    model.graph.outputs[0] = total.outputs[0]
    result = _apply(cleanup.EliminateCommonSubexpressions, ir.serde.serialize_model(model))
    assert _ops(result.model).count("Relu") == 1


def test_remove_unused_drops_dead_nodes():
    model = ir.serde.deserialize_model(mlp_model())
    relu = next(n for n in model.graph if n.op_type == "Relu")
    model.graph.insert_after(relu, ir.node("Neg", [relu.outputs[0]], name="dead"))
    result = _apply(cleanup.RemoveUnused, ir.serde.serialize_model(model))
    assert "Neg" not in _ops(result.model)
    assert result.records[0].rule_counts == {"dead": 1}


@pytest.mark.parametrize("pass_cls", [cleanup.RemoveUnused, cleanup.FoldConstants])
def test_unchanged_when_nothing_to_do(pass_cls):
    first = _apply(pass_cls, mlp_model())
    second = _apply(pass_cls, first.model)
    assert second.records[0].status == UNCHANGED
