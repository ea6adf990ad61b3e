"""One copy of the weights per run: the workspace, the streamed single-file writer, and the
pass manager's clones."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

from txcompile.graph import ort as rt
from txcompile.graph import streamed, workspace
from txcompile.pass_manager import ROLLED_BACK, PassManager
from txcompile.passes.base import PassContext, TxPass

FEEDS = {"x": np.random.default_rng(1).standard_normal((3, 64)).astype(np.float32)}


def _model() -> onnx.ModelProto:
    """x[batch, 64] → MatMul(64×64 weight, 16 KiB) → Add(bias, 256 B) → Relu; a Constant node."""
    rng = np.random.default_rng(0)
    weight = numpy_helper.from_array(rng.standard_normal((64, 64)).astype(np.float32), "weight")
    bias = numpy_helper.from_array(rng.standard_normal(64).astype(np.float32), "bias")
    scale = numpy_helper.from_array(np.full(64, 0.5, np.float32), "scale_value")
    nodes = [
        helper.make_node("MatMul", ["x", "weight"], ["mm"]),
        helper.make_node("Add", ["mm", "bias"], ["biased"]),
        helper.make_node("Constant", [], ["scale"], value=scale),
        helper.make_node("Mul", ["biased", "scale"], ["scaled"]),
        helper.make_node("Relu", ["scaled"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 64])],
        [weight, bias],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9
    return model


def test_weights_move_once_and_sessions_read_them_from_the_folder():
    proto = _model()
    expected = rt.run(rt.create_session(proto), FEEDS)
    model = ir.serde.deserialize_model(proto)
    with workspace.Workspace() as space:
        assert space.adopt(model) == 1  # the weight; the 256-byte bias stays inline
        weight = model.graph.initializers["weight"].const_value
        assert space.holds(weight)
        np.testing.assert_array_equal(weight.numpy(), numpy_helper.to_array(proto.graph.initializer[0]))
        assert space.adopt(model.clone()) == 0  # clones share the tensors: nothing written again
        skeleton = space.proto(model)
        stored = {t.name: t for t in skeleton.graph.initializer}
        assert stored["weight"].data_location == TensorProto.EXTERNAL and stored["bias"].raw_data
        assert skeleton.ByteSize() < 2048  # references, not the weights
        np.testing.assert_array_equal(rt.run(rt.create_session(skeleton), FEEDS)["y"], expected["y"])
        onnx.checker.check_model(str(space.file(skeleton)))
        folder = space.path
    assert not folder.exists()


def test_adopting_lets_go_of_the_parsed_proto():
    """A small tensor or Constant still read from the proto would keep every weight in it alive."""
    model = ir.serde.deserialize_model(_model())
    with workspace.Workspace() as space:
        space.adopt(model)
        tensors = [v.const_value for v in model.graph.initializers.values()]
        tensors += [
            a.value for n in model.graph for a in n.attributes.values() if a.type == ir.AttributeType.TENSOR
        ]
        assert len(tensors) == 3
        assert not any(isinstance(t, ir.TensorProtoTensor) for t in tensors)


def test_the_streamed_file_is_the_whole_model(tmp_path):
    proto = _model()
    model = ir.serde.deserialize_model(proto)
    path = tmp_path / "out.onnx"
    with workspace.Workspace() as space:
        space.adopt(model)
        streamed.save_inline(model, path)
    loaded = onnx.load(path)
    onnx.checker.check_model(loaded)
    assert not any(t.data_location == TensorProto.EXTERNAL for t in loaded.graph.initializer)
    got = {t.name: numpy_helper.to_array(t) for t in loaded.graph.initializer}
    want = {t.name: numpy_helper.to_array(t) for t in proto.graph.initializer}
    assert got.keys() == want.keys() and all(np.array_equal(got[k], want[k]) for k in want)
    expected = rt.run(rt.create_session(proto), FEEDS)["y"]
    np.testing.assert_array_equal(rt.run(rt.create_session(str(path)), FEEDS)["y"], expected)
    assert [n.op_type for n in ir.load(path).graph] == ["MatMul", "Add", "Constant", "Mul", "Relu"]


class ZeroTheWeightThenBreak(TxPass):
    """Replaces the weight's tensor and renames a node, then leaves a dangling input: rolled back."""

    name = "zero-then-break"
    summary = "test pass"

    def call(self, model):
        value = model.graph.initializers["weight"]
        value.const_value = ir.tensor(np.zeros((64, 64), np.float32), name="weight")
        model.graph.node(0).name = "renamed"
        model.graph.node(1).replace_input_with(0, ir.Value(name="nowhere"))
        return ir.passes.PassResult(model, True)


def test_a_rolled_back_pass_leaves_the_accepted_model_as_it_was():
    proto = _model()
    result = PassManager([ZeroTheWeightThenBreak(PassContext())]).run(proto, FEEDS)
    assert result.records[0].status == ROLLED_BACK
    assert result.model is proto  # nothing applied: the input itself
    final = result.ir_model
    assert final.graph.node(0).name != "renamed"
    weight = final.graph.initializers["weight"].const_value.numpy()
    np.testing.assert_array_equal(weight, numpy_helper.to_array(proto.graph.initializer[0]))


@pytest.mark.parametrize("verify", [True, False])
def test_optimize_writes_nothing_outside_its_output(tmp_path, verify, monkeypatch):
    """The workspace lives under the temporary folder and is gone after the command."""
    from txcompile import cli

    temporary = tmp_path / "tmp"
    temporary.mkdir()
    monkeypatch.setenv("TMPDIR", str(temporary))
    monkeypatch.setattr(workspace.tempfile, "tempdir", None)
    onnx.save(_model(), tmp_path / "in.onnx")
    flags = [] if verify else ["--no-verify"]
    assert cli.main(["optimize", str(tmp_path / "in.onnx"), "-o", str(tmp_path / "out.onnx"), *flags]) == 0
    assert list(temporary.iterdir()) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.onnx", "out.onnx", "out.report.json", "tmp"]


def test_a_killed_runs_workspace_is_removed_by_the_next(tmp_path, monkeypatch):
    """A run killed outright (kill -9, the OOM killer) cannot remove its folder; the next does."""
    monkeypatch.setattr(workspace.tempfile, "tempdir", str(tmp_path))
    child = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    dead = tmp_path / f"{workspace.PREFIX}{int(child.stdout)}-abcd"
    live = tmp_path / f"{workspace.PREFIX}{os.getpid()}-efgh"
    other = tmp_path / f"{workspace.PREFIX}k2x9_qab"  # not named by a pid: left alone
    for folder in (dead, live, other):
        folder.mkdir()
        (folder / "weights-0.data").write_bytes(b"\0" * 16)
    with workspace.Workspace() as space:
        assert space.path.name.startswith(f"{workspace.PREFIX}{os.getpid()}-")
        assert not dead.exists() and live.exists() and other.exists()
