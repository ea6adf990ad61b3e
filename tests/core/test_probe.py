"""The one probe that exposes intermediates and runs ORT on them."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from txcompile.graph.build import GraphBuilder
from txcompile.graph.probe import probe_runs, probe_shapes, probe_values


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
