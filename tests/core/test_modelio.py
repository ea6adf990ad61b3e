import os

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from txcompile.graph import modelio, writes
from txcompile.graph.errors import TxError


def test_load_valid(mlp_file):
    model = modelio.load_model(mlp_file)
    assert len(model.graph.node) == 7


def test_missing_file(tmp_path):
    with pytest.raises(TxError, match="no such file"):
        modelio.load_model(tmp_path / "nope.onnx")


def test_corrupt_file(tmp_path):
    path = tmp_path / "bad.onnx"
    path.write_bytes(os.urandom(200))
    with pytest.raises(TxError, match="corrupt or truncated|invalid"):
        modelio.load_model(path)


def test_truncated_file(tmp_path, mlp_file):
    data = open(mlp_file, "rb").read()
    path = tmp_path / "cut.onnx"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(TxError):
        modelio.load_model(path)


def _external(tmp_path, mlp, location: str) -> str:
    folder = tmp_path / "model"
    folder.mkdir()
    path = folder / "m.onnx"
    onnx.save(mlp, path, save_as_external_data=True, location="m.onnx.data", size_threshold=0)
    model = onnx.load(path, load_external_data=False)
    for tensor in model.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location":
                entry.value = location
    onnx.save(model, path)
    return str(path)


def test_external_data_loads(tmp_path, mlp):
    path = _external(tmp_path, mlp, "m.onnx.data")
    loaded = modelio.load_model(path)
    weight = next(t for t in loaded.graph.initializer if t.name == "weight")
    assert numpy_helper.to_array(weight).shape == (8, 8)


def test_external_data_missing(tmp_path, mlp):
    path = _external(tmp_path, mlp, "m.onnx.data")
    os.remove(os.path.join(os.path.dirname(path), "m.onnx.data"))
    with pytest.raises(TxError, match="missing"):
        modelio.load_model(path)


def test_external_data_outside_folder(tmp_path, mlp):
    path = _external(tmp_path, mlp, "../secret.data")
    (tmp_path / "secret.data").write_bytes(b"\0" * 1024)
    with pytest.raises(TxError, match="outside"):
        modelio.load_model(path)


def test_external_data_truncated(tmp_path, mlp):
    path = _external(tmp_path, mlp, "m.onnx.data")
    data = os.path.join(os.path.dirname(path), "m.onnx.data")
    with open(data, "r+b") as handle:
        handle.truncate(16)
    with pytest.raises(TxError, match="truncated"):
        modelio.load_model(path)


def test_output_equal_to_input_is_refused(mlp_file):
    with pytest.raises(TxError, match="equals the input"):
        writes.check_outputs([mlp_file], [mlp_file])


def test_output_folder_must_exist(tmp_path):
    with pytest.raises(TxError, match="does not exist"):
        writes.check_outputs([tmp_path / "no" / "out.onnx"], [])


def test_a_report_never_replaces_a_model(mlp_file, tmp_path):
    """`inspect --html` or `bench --json` onto some other model is a slip, not a request."""
    with pytest.raises(TxError, match="a model's path"):
        writes.check_outputs([tmp_path / "other.onnx"], [mlp_file], models=False)
    writes.check_outputs([tmp_path / "timings.json"], [mlp_file], models=False)


def test_an_unusable_model_path_is_bad_input(tmp_path, capsys):
    from txcompile import cli

    for command in (["run"], ["bench"], ["optimize", "-o", str(tmp_path / "o.onnx")]):
        assert cli.main([*command, str(tmp_path / ("a" * 300))]) == 2
        err = capsys.readouterr().err
        assert err.startswith("txcompile: error: ") and len(err.strip().splitlines()) == 1, err


def test_save_is_atomic_and_leaves_no_staging(tmp_path, mlp):
    target = tmp_path / "out.onnx"
    modelio.save_model(mlp, target)
    assert [p.name for p in tmp_path.iterdir()] == ["out.onnx"]
    assert onnx.load(target).graph.name == "mlp"


def test_large_models_save_with_external_data(tmp_path, mlp, monkeypatch):
    monkeypatch.setattr(modelio, "EXTERNAL_DATA_THRESHOLD", 0)
    monkeypatch.setattr(modelio, "EXTERNAL_TENSOR_MIN_BYTES", 0)
    target = tmp_path / "out.onnx"
    modelio.save_model(mlp, target)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.onnx", "out.onnx.data"]
    assert mlp.graph.initializer[0].HasField("raw_data") or mlp.graph.initializer[0].float_data
    reloaded = modelio.load_model(target)
    weights = {t.name: numpy_helper.to_array(t) for t in reloaded.graph.initializer}
    expected = {t.name: numpy_helper.to_array(t) for t in mlp.graph.initializer}
    assert all(np.array_equal(weights[k], expected[k]) for k in expected)
