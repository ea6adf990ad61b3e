"""export_onnx: the dynamo → TorchScript fallback, forced exporters, static shapes, failures."""

from __future__ import annotations

import onnx
import pytest
import torch

from txcompile.exporters import TorchModel, export_onnx, torch_export
from txcompile.graph.errors import TxError
from txcompile.graph.inputs import InputSpec, read_specs

from .conftest import ort_vs_torch


class DataDependent(torch.nn.Module):
    """Python control flow on a tensor's value: torch.export refuses it, tracing records one branch."""

    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(50, 8)
        self.proj = torch.nn.Linear(8, 8)

    def forward(self, input_ids, attention_mask):
        x = self.embed(input_ids) * attention_mask[..., None]
        if (x * x).sum() > 0:  # true for any real input, so the traced branch generalizes
            x = x * 2
        return self.proj(x)


class Small(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(8, 4)

    def forward(self, hidden):
        return torch.tanh(self.proj(hidden))


def data_dependent() -> TorchModel:
    torch.manual_seed(0)
    inputs = [
        InputSpec("input_ids", "int64", ("batch", "seq"), "ids", 0, 50),
        InputSpec("attention_mask", "int64", ("batch", "seq"), "mask"),
    ]
    return TorchModel(DataDependent().eval(), inputs, ["hidden"], "test:data-dependent")


def small() -> TorchModel:
    torch.manual_seed(0)
    inputs = [InputSpec("hidden", "float32", ("batch", "seq", 8), "normal")]
    return TorchModel(Small().eval(), inputs, ["out"], "test:small")


def test_auto_falls_back_to_torchscript_when_dynamo_raises():
    model = data_dependent()
    result = export_onnx(model)
    assert result.exporter == "torchscript"
    assert result.fallback_reason.startswith("dynamo failed: ")
    assert "data-dependent" in result.fallback_reason and "\n" not in result.fallback_reason
    assert result.max_diff < 1e-4
    assert ort_vs_torch(result, model, {"batch": 3, "seq": 5}) < 1e-4
    assert {p.key: p.value for p in result.model.metadata_props}["txcompile.exporter"] == "torchscript"
    assert any("TracerWarning" in w and "Python boolean" in w for w in result.warnings)


def test_forced_dynamo_raises_instead_of_falling_back():
    with pytest.raises(TxError, match=r"^export failed: dynamo: .*data-dependent"):
        export_onnx(data_dependent(), exporter="dynamo")


def test_auto_falls_back_when_ort_rejects_the_dynamo_model(monkeypatch):
    real = torch_export._EXPORTERS["dynamo"]

    def broken(*args):
        proto = real(*args)
        proto.graph.node[-1].op_type = "NoSuchOp"
        return proto

    monkeypatch.setitem(torch_export._EXPORTERS, "dynamo", broken)
    result = export_onnx(small())
    assert result.exporter == "torchscript"
    assert "ONNX Runtime rejects its model: cannot load" in result.fallback_reason


def test_both_exporters_failing_names_both(monkeypatch):
    def fail(message):
        def export(*args):
            raise RuntimeError(message)

        return export

    monkeypatch.setitem(torch_export._EXPORTERS, "dynamo", fail("no dynamo today"))
    monkeypatch.setitem(torch_export._EXPORTERS, "torchscript", fail("no tracing either"))
    with pytest.raises(TxError) as caught:
        export_onnx(small())
    assert str(caught.value) == (
        "export failed: dynamo: RuntimeError: no dynamo today; torchscript: RuntimeError: no tracing either"
    )


def test_static_export_fixes_every_axis():
    model = small()
    result = export_onnx(model, exporter="torchscript", dynamic=False, dims={"batch": 3, "seq": 4})
    dims = result.model.graph.input[0].type.tensor_type.shape.dim
    assert [d.dim_value for d in dims] == [3, 4, 8]
    assert read_specs(result.model)[0].shape == (3, 4, 8)
    assert result.max_diff < 1e-5


def test_dynamo_export_is_quiet_and_dynamic(capfd):
    model = small()
    result = export_onnx(model, exporter="dynamo", opset=18)
    out, err = capfd.readouterr()
    assert out == "" and err == ""
    assert result.opset == 18
    dims = [d.dim_param or d.dim_value for d in result.model.graph.input[0].type.tensor_type.shape.dim]
    assert dims == ["batch", "seq", 8]
    assert [o.name for o in result.model.graph.output] == ["out"]
    assert result.seconds > 0
    onnx.checker.check_model(result.model)


def test_failing_forward_is_a_clear_error():
    model = small()
    model.inputs = [InputSpec("hidden", "float32", ("batch", "seq", 5), "normal")]
    with pytest.raises(TxError, match="test:small: forward fails on example inputs: RuntimeError"):
        export_onnx(model)


def test_unknown_exporter():
    with pytest.raises(TxError, match="unknown exporter 'onnx': choose auto, dynamo, torchscript"):
        export_onnx(small(), exporter="onnx")


def test_fixed_axis_is_reported():
    """A reshape to a constant size fixes the seq axis: the graph and the metadata say so."""

    class Flatten(torch.nn.Module):
        def forward(self, hidden):
            return hidden.reshape(hidden.shape[0], 48)

    inputs = [InputSpec("hidden", "float32", ("batch", "seq", 8), "normal")]
    model = TorchModel(Flatten().eval(), inputs, ["out"], "test:fixed", {"batch": 2, "seq": 6})
    result = export_onnx(model, exporter="dynamo")
    assert result.warnings == ["dynamo fixed axis 1 (seq) of hidden to 6"]
    assert read_specs(result.model)[0].shape == ("batch", 6, 8)
    assert ort_vs_torch(result, model, {"batch": 5, "seq": 6}) == 0


def test_model_static_in_pytorch_is_a_warning_not_a_failure():
    """A learned table of one length: dynamo fixes the axis; after tracing, a warning says so."""

    class FixedSeq(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.position = torch.nn.Parameter(torch.randn(1, 6, 8))

        def forward(self, hidden):
            return hidden + self.position

    inputs = [InputSpec("hidden", "float32", ("batch", "seq", 8), "normal")]
    model = TorchModel(FixedSeq().eval(), inputs, ["out"], "test:fixed", {"batch": 2, "seq": 6})
    assert export_onnx(model).warnings == ["dynamo fixed axis 1 (seq) of hidden to 6"]
    # tracing cannot tell, so the check at other sizes finds PyTorch itself failing
    result = export_onnx(model, exporter="torchscript")
    assert result.max_diff == 0 and len(result.warnings) == 1
    assert result.warnings[0].startswith("dynamic axes unchecked: PyTorch fails at batch=3, seq=4")


@pytest.mark.parametrize("exporter", ["dynamo", "torchscript"])
def test_the_export_writes_its_weights_once_and_compile_reuses_them(exporter, tmp_path):
    """The export's weights go straight from torch into a workspace (no proto of the whole
    model); optimizing the export reads them there instead of writing them again."""
    from txcompile import api
    from txcompile.exporters import load_model_spec
    from txcompile.graph import modelio

    torch_model = load_model_spec("tiny-bert")
    result = export_onnx(torch_model, exporter=exporter, dims={"batch": 2, "seq": 8})
    weights = [
        v.const_value for v in result.ir_model.graph.initializers.values() if v.const_value.nbytes >= 1024
    ]
    assert weights and all(result.space.holds(t) for t in weights)
    files = sorted(p.name for p in result.space.path.glob("weights-*.data"))
    compiled = api.compile_exported(torch_model, result, api.settings(dims={"batch": 2, "seq": 8}))
    assert compiled.passed and compiled.outcome.space is result.space
    assert sorted(p.name for p in result.space.path.glob("weights-*.data"))[: len(files)] == files
    # the stand-alone proto and a file written from the workspace are the same model
    path = tmp_path / "export.onnx"
    modelio.save_model(result.ir_model, path)
    saved = {t.name: onnx.numpy_helper.to_array(t) for t in onnx.load(path).graph.initializer}
    inline = {t.name: onnx.numpy_helper.to_array(t) for t in result.model.graph.initializer}
    assert saved.keys() == inline.keys() and all((saved[k] == inline[k]).all() for k in saved)
    assert ort_vs_torch(result, torch_model, {"batch": 2, "seq": 8}) < 1e-4
