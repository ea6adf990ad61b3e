"""load_model_spec: built-in names, file.py:factory, and one clear TxError per bad spec."""

from __future__ import annotations

import pytest
import torch

from txcompile.exporters import BUILTINS, export_onnx, load_model_spec
from txcompile.exporters.spec import infer_spec
from txcompile.graph.errors import TxError
from txcompile.graph.inputs import InputSpec

from .conftest import ort_vs_torch

FACTORY = """
import torch


class Tagger(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(30, 8)
        self.head = torch.nn.Linear(8, 3)

    def forward(self, input_ids, attention_mask):
        return self.head(self.embed(input_ids) * attention_mask[..., None])


def make():
    torch.manual_seed(0)
    ids = torch.randint(0, 30, (2, 5))
    return Tagger(), {"input_ids": ids, "attention_mask": torch.ones(2, 5, dtype=torch.long)}


def as_tuple():
    model, inputs = make()
    return model, tuple(inputs.values())


def broken():
    raise ValueError("no weights here")


def not_a_pair():
    return Tagger()


def not_a_module():
    return "model", {"x": torch.ones(2)}


def not_tensors():
    return Tagger(), {"input_ids": [1, 2, 3]}


def bad_forward():
    return Tagger(), {"input_ids": torch.zeros(2, 5, dtype=torch.long)}


class Stop(BaseException):
    pass


def base_exception():
    raise Stop("not an Exception")


def exits():
    raise SystemExit(0)


def ends_the_process():
    import os

    os._exit(0)


NOT_CALLABLE = 3
"""


@pytest.fixture
def factory_file(tmp_path):
    path = tmp_path / "user_model.py"
    path.write_text(FACTORY)
    return path


def test_builtin_names_resolve():
    for name in BUILTINS:
        model = load_model_spec(name)
        assert model.source == name and not model.module.training


def test_factory_with_dict_inputs(factory_file):
    model = load_model_spec(f"{factory_file}:make")
    assert model.input_names == ["input_ids", "attention_mask"]
    ids, mask = model.inputs
    assert (ids.kind, ids.low, ids.shape) == ("ids", 0, ("batch", "seq"))
    assert 2 <= ids.high <= 30
    assert (mask.kind, mask.shape) == ("mask", ("batch", "seq"))
    assert model.output_names == ["output"]
    assert model.dims == {"batch": 2, "seq": 5}
    result = export_onnx(model, exporter="torchscript")
    assert result.max_diff < 1e-5
    assert ort_vs_torch(result, model, {"batch": 3, "seq": 4}) < 1e-5


def test_factory_with_tuple_inputs(factory_file):
    model = load_model_spec(f"{factory_file}:as_tuple")
    assert model.input_names == ["input_0", "input_1"]
    assert [s.kind for s in model.inputs] == ["ids", "ids"]


def test_infer_spec_rules():
    assert infer_spec("position_ids", torch.arange(4)[None]).kind == "positions"
    assert infer_spec("mask", torch.ones(2, 3, dtype=torch.bool)).kind == "mask"
    assert infer_spec("attention_mask", torch.ones(2, 3)).kind == "mask"
    hidden = infer_spec("hidden", torch.zeros(2, 7, 16))
    assert (hidden.kind, hidden.dtype, hidden.shape) == ("normal", "float32", ("batch", "seq", 16))
    image = infer_spec("pixels", torch.zeros(2, 3, 8, 8))
    assert image.shape == ("batch", 3, 8, 8)
    assert infer_spec("ids", torch.tensor([[4, 9]])) == InputSpec(
        "ids", "int64", ("batch", "seq"), "ids", 0, 10
    )


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("", "empty model spec"),
        (
            "tiny-gpt9",
            "tiny-gpt9: unknown model (built-ins: tiny-bert, tiny-llama, tiny-llama-decoder, tiny-vit",
        ),
        ("model.onnx", "model.onnx: already an ONNX model; use `txcompile optimize model.onnx` instead"),
        ("./no/such/folder", "./no/such/folder: no such folder (models are never downloaded"),
        ("bert-base-uncased/", "bert-base-uncased/: no such folder"),
        ("missing.py:make", "missing.py:make: file missing.py not found"),
    ],
)
def test_bad_specs(spec, message):
    with pytest.raises(TxError) as caught:
        load_model_spec(spec)
    assert str(caught.value).startswith(message)
    assert "\n" not in str(caught.value)


@pytest.mark.parametrize(
    ("factory", "message"),
    [
        ("nothing", "has no nothing"),
        ("NOT_CALLABLE", "NOT_CALLABLE in .* is not callable"),
        ("broken", r"broken\(\) raised ValueError: no weights here"),
        ("not_a_pair", r"not_a_pair\(\) must return \(module, example_inputs\), got Tagger"),
        ("not_a_module", r"not_a_module\(\) returned str, not a torch.nn.Module"),
        ("not_tensors", "example input input_ids is list, not a tensor"),
        ("bad_forward", r"forward fails on bad_forward\(\)'s example inputs: TypeError"),
        ("base_exception", r"base_exception\(\) raised Stop: not an Exception"),
        ("exits", r"exits\(\) raised SystemExit"),
        ("ends_the_process", r"ends_the_process\(\) raised _ProcessExit: os._exit\(0\)"),
    ],
)
def test_bad_factories(factory_file, factory, message):
    spec = f"{factory_file}:{factory}"
    with pytest.raises(TxError, match=message) as caught:
        load_model_spec(spec)
    assert str(caught.value).startswith(f"{spec}: ")
    assert "\n" not in str(caught.value)


def test_factory_file_that_fails_to_import(tmp_path):
    path = tmp_path / "broken.py"
    path.write_text("import torch\ndef make(:\n")
    with pytest.raises(TxError, match=r"broken.py:make: cannot import .*broken.py: SyntaxError"):
        load_model_spec(f"{path}:make")
    path.write_text("import no_such_module_here\n")
    with pytest.raises(
        TxError, match="cannot import .* ModuleNotFoundError: No module named 'no_such_module_here'"
    ):
        load_model_spec(f"{path}:make")


def test_python_file_without_factory(factory_file):
    with pytest.raises(TxError, match="name the factory to call, as file.py:factory"):
        load_model_spec(str(factory_file))


def test_folder_without_config(tmp_path):
    with pytest.raises(TxError, match=r"no config.json in .* \(not a Hugging Face model folder\)"):
        load_model_spec(str(tmp_path))


def test_folder_with_bad_config(tmp_path):
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(TxError, match="cannot read config.json"):
        load_model_spec(str(tmp_path))
    (tmp_path / "config.json").write_text('{"model_type": "no-such-type"}')
    with pytest.raises(TxError, match=f"{tmp_path}: "):
        load_model_spec(str(tmp_path))


def test_factory_can_import_its_neighbours(tmp_path):
    (tmp_path / "layers_for_txcompile_test.py").write_text(
        "import torch\n\nclass Double(torch.nn.Module):\n    def forward(self, x):\n        return 2 * x\n"
    )
    (tmp_path / "entry.py").write_text(
        "import torch\nfrom layers_for_txcompile_test import Double\n\n"
        "def make():\n    return Double(), (torch.ones(2, 4, 3),)\n"
    )
    model = load_model_spec(f"{tmp_path / 'entry.py'}:make")
    assert model.inputs[0].shape == ("batch", "seq", 3)
    assert str(tmp_path) not in __import__("sys").path
