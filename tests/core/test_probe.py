"""The one probe that exposes intermediates and runs ORT on them."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

from txcompile.graph import inputs, placeholders
from txcompile.graph import ort as rt
from txcompile.graph.build import GraphBuilder
from txcompile.graph.probe import probe_runs, probe_shapes, probe_values
from txcompile.passes.cleanup import analysis


def _model() -> ir.Model:
    x = ir.val("x", ir.DataType.FLOAT, ir.Shape(["batch", 3]))
    graph = ir.Graph([x], [], nodes=[], opset_imports={"": 18}, name="g")
    b = GraphBuilder(graph, "t")
    mid = b.op("Mul", x, b.const(2.0))
    mid.name = "mid"
    out = b.op("Softmax", mid, axis=-1)
    out.name = "out"
    b.commit()
    graph.outputs.append(out)
    return ir.Model(graph, ir_version=10)


def test_probe_runs_returns_each_feed_sets_values_of_intermediates_inputs_and_constants():
    model = _model()
    rng = np.random.default_rng(0)
    feeds = [{"x": rng.standard_normal((b, 3)).astype(np.float32)} for b in (2, 5)]
    found = probe_runs(model, ["mid", "out", "x", "t/c1"], feeds)
    for run, feed in enumerate(feeds):
        np.testing.assert_array_equal(found["mid"][run], 2 * feed["x"])
        np.testing.assert_array_equal(found["x"][run], feed["x"])
        assert found["t/c1"][run] == 2.0
        np.testing.assert_allclose(found["out"][run].sum(-1), 1.0, rtol=1e-6)
    assert model.graph.outputs[0].name == "out" and len(model.graph.outputs) == 1  # model untouched


def test_probe_shapes_and_values_agree_with_a_run():
    model = _model()
    feed = {"x": np.ones((4, 3), np.float32)}
    mid = model.graph[0].outputs[0]
    assert probe_shapes(model, [mid], feed) == {"mid": (4, 3)}
    np.testing.assert_array_equal(probe_values(model, [mid], feed)["mid"], np.full((4, 3), 2.0))
    assert probe_values(model, [mid], {}) == {}  # no verification inputs: nothing to probe


def _weight_model(use: str) -> onnx.ModelProto:
    """x @ W (W 64 KiB) → Reshape, and W's values used as ``use`` says."""
    w = numpy_helper.from_array(np.full((128, 128), 0.5, np.float32), "W")
    shape = numpy_helper.from_array(np.array([-1, 16, 8], np.int64), "shape")
    nodes = [
        helper.make_node("MatMul", ["x", "W"], ["h"]),
        helper.make_node("Reshape", ["h", "shape"], ["y"]),
        helper.make_node("Shape", ["W"], ["w_shape"]),  # depends on W's shape only
    ]
    if use == "index":  # W's values become indices
        nodes += [
            helper.make_node("Cast", ["W"], ["w_int"], to=TensorProto.INT64),
            helper.make_node("Gather", ["w_shape", "w_int"], ["picked"]),
        ]
    if use == "shape":  # W's values become a shape (ReduceMax is listed; Reshape's shape is not)
        nodes += [
            helper.make_node("ReduceMax", ["W"], ["w_max"], keepdims=0),
            helper.make_node("Cast", ["w_max"], ["n"], to=TensorProto.INT64),
            helper.make_node("Reshape", ["x", "w_shape"], ["x2"]),
            helper.make_node("Expand", ["x2", "n"], ["expanded"]),
        ]
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["rows", 16, 8])]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 128])
    graph = helper.make_graph(nodes, "g", [x], outputs, [w, shape])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=10)


def test_a_shape_probe_makes_weights_whose_values_reach_no_shape_as_zeros():
    proto = _weight_model("data")
    assert placeholders.replace_weights(proto) == 1
    assert [t.name for t in proto.graph.initializer] == ["shape", "W__probe_shape"]
    assert proto.graph.node[0].op_type == "ConstantOfShape" and proto.graph.node[0].output == ["W"]
    onnx.checker.check_model(proto)
    session = rt.create_session(proto, optimize=False)
    (y,) = session.run(None, {"x": np.ones((3, 128), np.float32)})
    assert y.shape == (3, 16, 8) and not y.any()  # the shapes of the real run; the values zero


def test_weights_whose_values_reach_an_index_or_a_shape_stay():
    for use in ("index", "shape"):
        proto = _weight_model(use)
        before = proto.SerializeToString()
        assert placeholders.replace_weights(proto) == 0, use
        assert proto.SerializeToString() == before, use


def test_weights_under_control_flow_stay():
    proto = _weight_model("data")
    branch = helper.make_graph(
        [helper.make_node("Identity", ["W"], ["b"])],
        "then",
        [],
        [helper.make_tensor_value_info("b", TensorProto.FLOAT, None)],
    )
    cond = numpy_helper.from_array(np.array(True), "cond")
    proto.graph.initializer.append(cond)
    proto.graph.node.append(helper.make_node("If", ["cond"], ["z"], then_branch=branch, else_branch=branch))
    assert placeholders.replace_weights(proto) == 0


@pytest.fixture(scope="module")
def tiny_bert() -> onnx.ModelProto:
    from txcompile.exporters import export_onnx, load_model_spec

    return export_onnx(load_model_spec("tiny-bert"), dims={"batch": 2, "seq": 16}).model


def test_shapes_of_a_real_export_are_the_same_with_its_weights_made_as_zeros(tiny_bert, monkeypatch):
    feeds = inputs.make_feeds(inputs.read_specs(tiny_bert), {"batch": 2, "seq": 16})
    real = analysis.observed_shapes(tiny_bert, feeds)
    replaced = []
    monkeypatch.setattr(placeholders, "MIN_BYTES", 0)  # every float weight of the tiny model
    original = placeholders.replace_weights
    monkeypatch.setattr(
        placeholders, "replace_weights", lambda p: replaced.append(original(p)) or replaced[-1]
    )
    assert analysis.observed_shapes(tiny_bert, feeds) == real
    assert replaced[0] > 20  # the model's matrices, embeddings and norm weights


def test_a_probe_runs_only_the_nodes_its_values_are_computed_from(monkeypatch):
    model = ir.serde.deserialize_model(_weight_model("index"))
    built = []
    create = rt.create_session
    monkeypatch.setattr(rt, "create_session", lambda proto, **kw: built.append(proto) or create(proto, **kw))
    h = next(n for n in model.graph if n.op_type == "MatMul").outputs[0]
    assert probe_shapes(model, [h], {"x": np.ones((2, 128), np.float32)}) == {"h": (2, 128)}
    (proto,) = built
    # not the Reshape, Cast or Gather; and without the Cast to an index, W's values reach no
    # shape in what is left, so it is made as zeros
    assert [n.op_type for n in proto.graph.node] == ["ConstantOfShape", "MatMul"]
    assert [o.name for o in proto.graph.output] == ["h"]
    assert [t.name for t in proto.graph.initializer] == ["W__probe_shape"]
    assert model.graph.outputs[0].name == "y" and len(model.graph) == 5  # the model untouched
