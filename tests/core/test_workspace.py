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
from txcompile.graph import streamed, workspace, writes
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


def test_a_stand_alone_copy_leaves_the_weights_it_copied_readable():
    """``standalone_proto`` copies each weight out of the folder; the model it was made from, and
    arrays still reading its weights, keep working (onnx_ir's load_to_model would close the
    mapping under them: BufferError while an array exists)."""
    proto = _model()
    model = ir.serde.deserialize_model(proto)
    with workspace.Workspace() as space:
        space.adopt(model)
        reading = model.graph.initializers["weight"].const_value.numpy()  # a view of the mapping
        alone = workspace.standalone_proto(model)
        np.testing.assert_array_equal(numpy_helper.to_array(alone.graph.initializer[0]), reading)
        assert alone.graph.initializer[0].data_location != TensorProto.EXTERNAL
        np.testing.assert_array_equal(model.graph.initializers["weight"].const_value.numpy(), reading)
        del reading


def test_sessions_share_one_mapping_of_the_weights():
    """Every session of a run reads the weights from the workspace's one mapping of each data
    file (onnxruntime's shared initializers), not from a mapping or copy of its own."""
    proto = _model()
    expected = rt.run(rt.create_session(proto), FEEDS)["y"]
    model = ir.serde.deserialize_model(proto)
    with workspace.Workspace() as space:
        skeleton = space.proto(model)
        first, second = rt.create_session(skeleton), rt.create_session(space.proto(model.clone()))
        assert set(first.txcompile_shared_weights) == {"weight"}  # the bias is inline
        a = first.txcompile_shared_weights["weight"].numpy()
        b = second.txcompile_shared_weights["weight"].numpy()
        assert np.shares_memory(a, b)
        for session in (first, second):
            np.testing.assert_array_equal(rt.run(session, FEEDS)["y"], expected)
        space.trim(model)  # the pages go; the data stays valid and is read back in
        np.testing.assert_array_equal(rt.run(first, FEEDS)["y"], expected)
        np.testing.assert_array_equal(
            model.graph.initializers["weight"].const_value.numpy(),
            numpy_helper.to_array(proto.graph.initializer[0]),
        )


def test_weights_onnxruntime_cannot_take_as_arrays_are_read_by_the_session():
    """bfloat16 has no numpy dtype onnxruntime takes: the session reads it from the file itself."""
    proto = _model()
    weight = proto.graph.initializer[0]
    cast = helper.make_tensor(
        "weight", TensorProto.BFLOAT16, [64, 64], np.zeros(64 * 64, np.uint16).tobytes(), raw=True
    )
    weight.CopyFrom(cast)
    proto.graph.node.insert(0, helper.make_node("Cast", ["weight"], ["weight_f"], to=TensorProto.FLOAT))
    proto.graph.node[1].input[1] = "weight_f"
    model = ir.serde.deserialize_model(proto)
    with workspace.Workspace() as space:
        skeleton = space.proto(model)
        assert space.shared_weights(skeleton) == {}
        session = rt.create_session(skeleton)
        assert rt.run(session, FEEDS)["y"].shape == (3, 64)


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
        sha256 = streamed.save_inline(model, path)
    assert sha256 == writes.digest(path)  # hashed while written, the file's own digest
    loaded = onnx.load(path)
    onnx.checker.check_model(loaded)
    assert not any(t.data_location == TensorProto.EXTERNAL for t in loaded.graph.initializer)
    got = {t.name: numpy_helper.to_array(t) for t in loaded.graph.initializer}
    want = {t.name: numpy_helper.to_array(t) for t in proto.graph.initializer}
    assert got.keys() == want.keys() and all(np.array_equal(got[k], want[k]) for k in want)
    expected = rt.run(rt.create_session(proto), FEEDS)["y"]
    np.testing.assert_array_equal(rt.run(rt.create_session(str(path)), FEEDS)["y"], expected)
    assert [n.op_type for n in ir.load(path).graph] == ["MatMul", "Add", "Constant", "Mul", "Relu"]


def test_the_skeleton_refers_to_the_weights_where_they_lie(tmp_path):
    """Reading a file for optimize parses its graph only: each large inline initializer turns
    into external data at its offset in the file itself, also in a streamed file (one graph
    field per initializer, merged on parsing)."""
    proto = _model()
    plain, merged = tmp_path / "plain.onnx", tmp_path / "merged.onnx"
    onnx.save(proto, plain)
    with workspace.Workspace() as space:
        model = ir.serde.deserialize_model(proto)
        space.adopt(model)
        streamed.save_inline(model, merged)
    want = {t.name: numpy_helper.to_array(t) for t in proto.graph.initializer}
    for path in (plain, merged):
        skeleton = onnx.ModelProto.FromString(streamed.read_skeleton(path))
        external = [t.name for t in skeleton.graph.initializer if t.data_location == TensorProto.EXTERNAL]
        assert external == ["weight"]  # the 256-byte bias stays inline
        assert skeleton.ByteSize() < 2048
        onnx.load_external_data_for_model(skeleton, str(tmp_path))
        got = {t.name: numpy_helper.to_array(t) for t in skeleton.graph.initializer}
        assert got.keys() == want.keys() and all(np.array_equal(got[k], want[k]) for k in want)
    (tmp_path / "empty.onnx").write_bytes(b"")
    (tmp_path / "text.onnx").write_bytes(b"ir_version: 9\ngraph { }\n")
    (tmp_path / "cut.onnx").write_bytes(plain.read_bytes()[:-100])
    for name in ("empty.onnx", "text.onnx", "cut.onnx"):
        assert streamed.read_skeleton(tmp_path / name) is None


def test_optimize_reads_the_weights_from_the_input_file_once(tmp_path):
    """optimize copies the input's weights file to file into its workspace; a tensor whose
    bytes do not fit its shape is one line, exit 2."""
    from txcompile import cli

    proto = _model()
    onnx.save(proto, tmp_path / "in.onnx")
    assert cli.main(["optimize", str(tmp_path / "in.onnx"), "-o", str(tmp_path / "out.onnx")]) == 0
    out = onnx.load(tmp_path / "out.onnx")
    weights = {t.name: numpy_helper.to_array(t) for t in out.graph.initializer}
    np.testing.assert_array_equal(weights["weight"], numpy_helper.to_array(proto.graph.initializer[0]))
    proto.graph.initializer[0].raw_data = proto.graph.initializer[0].raw_data[:-4]
    onnx.save(proto, tmp_path / "short.onnx")
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "txcompile",
            "optimize",
            str(tmp_path / "short.onnx"),
            "-o",
            str(tmp_path / "o.onnx"),
        ],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 2 and not (tmp_path / "o.onnx").exists()
    assert (
        result.stderr.count("\n") == 1
        and "has 16380 bytes of data; its shape [64, 64] needs 16384" in result.stderr
    )


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
