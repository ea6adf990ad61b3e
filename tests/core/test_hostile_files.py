"""Files a careless user or an attacker hands over: a model whose txcompile metadata says
anything, inputs that are not an .npz, a model named .json. Each gets exit 2 and one line."""

from __future__ import annotations

import json
import zipfile

import numpy as np
import onnx
import pytest

from tests.conftest import mlp_model
from tests.core.test_cli import _bad, _digest, tx

SPEC = {"name": "x", "dtype": "float32", "shape": ["batch", 8], "kind": "normal", "low": 0.0, "high": 1.0}


@pytest.mark.parametrize(
    ("recorded", "words"),
    [
        ("not json {", "metadata is unreadable"),
        (json.dumps({"x": 1}), "not a list"),
        (json.dumps([["x"]]), "not an object"),
        (json.dumps([{**SPEC, "extra": 1}]), "not an object"),
        (json.dumps([{**SPEC, "dtype": "float128"}]), "dtype 'float128'"),
        (json.dumps([{**SPEC, "shape": [2**40, 8]}]), "shape must list sizes"),
        (json.dumps([{**SPEC, "kind": "ids", "low": 5, "high": 5}]), "low < high"),
        (json.dumps([{**SPEC, "high": float("inf")}]), "finite"),
        ('[{"name": "x", "dtype": "float32", "shape": [], "high": 1' + "0" * 5000 + "}]", "unreadable"),
        ("[" * 100_000 + "]" * 100_000, "unreadable"),
    ],
)
def test_recorded_input_specs_are_checked(tmp_path, recorded, words):
    model = mlp_model()
    model.metadata_props.add(key="txcompile.inputs", value=recorded)
    path = tmp_path / "m.onnx"
    onnx.save(model, path)
    before = _digest(path)
    _bad(tx("run", path), 2, words)
    assert _digest(path) == before


def _write_zip_member(path):
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("x.npy", "not an array")


@pytest.mark.parametrize(
    ("write", "words"),
    [
        (lambda p: np.save(p, np.ones((2, 8), np.float32)), "a single array (.npy)"),
        (lambda p: np.savez(p, x=np.array([["a"] * 8] * 2)), "the model takes float32"),
        (lambda p: np.savez(p, x=np.ones(8, np.float32)), "with 1 axes"),
        (_write_zip_member, "cannot read inputs"),
        (lambda p: p.write_bytes(b"PK\x03\x04truncated"), "cannot read inputs"),
    ],
)
def test_inputs_that_are_not_a_proper_npz(tmp_path, mlp_file, write, words):
    inputs = tmp_path / "x.npz"
    write(inputs)
    if not inputs.exists():  # np.save appends .npy
        inputs.with_suffix(".npz.npy").rename(inputs)
    _bad(tx("run", mlp_file, "--inputs", inputs), 2, words)


def test_a_model_named_json_is_read_as_protobuf(tmp_path):
    path = tmp_path / "model.json"
    path.write_text(json.dumps({"graph": {"node": []}}))
    out = tmp_path / "out.onnx"
    _bad(tx("optimize", path, "-o", out), 2, "not a valid ONNX model")
    assert not out.exists()


def test_a_real_model_named_json_still_loads(tmp_path):
    path = tmp_path / "model.json"
    onnx.save(mlp_model(), path, format="protobuf")
    result = tx("run", path)
    assert result.returncode == 0, result.stderr


def _with_external(tmp_path, **fields):
    """The MLP with its weight moved to w.bin, then the external fields overwritten."""
    model = mlp_model()
    onnx.save(model, tmp_path / "m.onnx", save_as_external_data=True, location="w.bin", size_threshold=0)
    model = onnx.load(tmp_path / "m.onnx", load_external_data=False)
    weight = next(t for t in model.graph.initializer if t.name == "weight")
    entries = {e.key: e.value for e in weight.external_data} | fields
    del weight.external_data[:]
    for key, value in entries.items():
        weight.external_data.add(key=key, value=value)
    onnx.save(model, tmp_path / "m.onnx")
    return tmp_path / "m.onnx"


@pytest.mark.parametrize(
    ("fields", "words"),
    [
        ({"offset": "-5"}, "whole numbers"),
        ({"length": "abc"}, "whole numbers"),
        ({"offset": "9" * 5000}, "whole numbers"),
        ({"location": "w\0.bin"}, "unusable location"),
        ({"location": "x" * 300}, "unusable location"),
        ({"location": ""}, "unusable location"),
        ({"location": "loop/w.bin"}, "does not resolve"),
        ({"location": "../w.bin"}, "outside the model's folder"),
        ({"offset": "1000000"}, "truncated"),
    ],
)
def test_malformed_external_data_fields(tmp_path, fields, words):
    (tmp_path / "loop").symlink_to(tmp_path / "loop")
    path = _with_external(tmp_path, **fields)
    _bad(tx("run", path), 2, words)


def test_external_tensors_in_subgraphs_are_checked(tmp_path):
    """An If branch whose constant lives outside the folder: refused by our own traversal."""
    secret = onnx.numpy_helper.from_array(np.ones(4, np.float32), "c")
    secret.data_location = onnx.TensorProto.EXTERNAL
    secret.ClearField("raw_data")
    secret.external_data.add(key="location", value="../secret.bin")
    branch = onnx.helper.make_graph(
        [onnx.helper.make_node("Constant", [], ["y"], value=secret)],
        "branch",
        [],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [4])],
    )
    graph = onnx.helper.make_graph(
        [onnx.helper.make_node("If", ["cond"], ["out"], then_branch=branch, else_branch=branch)],
        "g",
        [onnx.helper.make_tensor_value_info("cond", onnx.TensorProto.BOOL, [])],
        [onnx.helper.make_tensor_value_info("out", onnx.TensorProto.FLOAT, [4])],
    )
    path = tmp_path / "if.onnx"
    onnx.save(onnx.helper.make_model(graph), path)
    _bad(tx("optimize", path, "-o", tmp_path / "out.onnx"), 2, "points outside the model's folder")
