"""The built-in models: what they compute (masks, causality) and that each exports dynamically."""

from __future__ import annotations

import onnx
import pytest
import torch

from txcompile.exporters import BUILTINS, export_onnx, load_model_spec
from txcompile.graph.inputs import read_specs

from .conftest import ort_vs_torch

OTHER_DIMS = {"batch": 3, "seq": 7}


@pytest.fixture(scope="module", params=sorted(BUILTINS))
def exported(request):
    model = load_model_spec(request.param)
    return model, export_onnx(model, exporter="dynamo")


def test_builtin_exports_with_dynamo_and_matches(exported):
    model, result = exported
    assert result.exporter == "dynamo" and result.fallback_reason is None
    assert result.max_diff < 1e-4
    assert result.warnings == []
    graph = result.model.graph
    assert [i.name for i in graph.input] == model.input_names
    assert [o.name for o in graph.output] == model.output_names
    assert result.opset == 20 or result.opset >= 17


def test_builtin_matches_at_other_sizes(exported):
    """A (batch, seq) unlike the export example's proves the axes are really dynamic."""
    model, result = exported
    assert ort_vs_torch(result, model, OTHER_DIMS) < 1e-4


def test_builtin_records_metadata(exported):
    model, result = exported
    props = {p.key: p.value for p in result.model.metadata_props}
    assert props["txcompile.source"] == model.source
    assert props["txcompile.exporter"] == "dynamo"
    assert read_specs(result.model) == model.inputs
    first = result.model.graph.input[0].type.tensor_type.shape.dim[0]
    assert first.dim_param == "batch"
    onnx.checker.check_model(result.model)


def test_tiny_bert_exports_with_torchscript():
    model = load_model_spec("tiny-bert")
    result = export_onnx(model, exporter="torchscript")
    assert result.exporter == "torchscript" and result.fallback_reason is None
    assert result.max_diff < 1e-4
    assert ort_vs_torch(result, model, OTHER_DIMS) < 1e-4
    props = {p.key: p.value for p in result.model.metadata_props}
    assert props["txcompile.exporter"] == "torchscript"


def test_builtins_are_deterministic_and_described():
    for name, (factory, description) in BUILTINS.items():
        assert description and "\n" not in description
        a, b = factory(), factory()
        assert a.source == name
        for (key, x), y in zip(a.module.state_dict().items(), b.module.state_dict().values(), strict=True):
            assert torch.equal(x, y), key


def test_example_inputs_have_padding():
    model = load_model_spec("tiny-bert")
    inputs = model.example_inputs()
    mask = inputs["attention_mask"]
    assert mask.shape == (2, 16) and mask[0].all() and not mask[1].all()
    assert int(inputs["input_ids"].max()) < 1000 and int(inputs["token_type_ids"].max()) < 2
    assert model.example_inputs({"batch": 4, "seq": 5})["input_ids"].shape == (4, 5)


@pytest.mark.parametrize("name", ["tiny-bert", "tiny-llama"])
def test_padding_is_masked(name):
    """Tokens behind padding do not change the outputs at real positions."""
    model = load_model_spec(name)
    inputs = model.example_inputs()
    padded = inputs["attention_mask"][1] == 0
    changed = {**inputs, "input_ids": inputs["input_ids"].clone()}
    changed["input_ids"][1, padded] = (changed["input_ids"][1, padded] + 1) % 1000
    with torch.no_grad():
        before = model.module(*inputs.values())
        after = model.module(*changed.values())
    assert torch.allclose(before[1, ~padded], after[1, ~padded], atol=1e-6)
    assert not torch.allclose(before[1, padded], after[1, padded])


def test_tiny_llama_is_causal():
    model = load_model_spec("tiny-llama")
    inputs = model.example_inputs({"batch": 1, "seq": 8})
    changed = inputs["input_ids"].clone()
    changed[0, 5] = (changed[0, 5] + 1) % 1000
    with torch.no_grad():
        before = model.module(inputs["input_ids"], inputs["attention_mask"])
        after = model.module(changed, inputs["attention_mask"])
    assert torch.allclose(before[0, :5], after[0, :5], atol=1e-6)
    assert not torch.allclose(before[0, 5:], after[0, 5:])
    assert before.shape == (1, 8, 1000)


def test_tiny_vit_shapes():
    model = load_model_spec("tiny-vit")
    (pixels,) = model.example_args()
    assert pixels.shape == (2, 3, 32, 32) and pixels.dtype == torch.float32
    with torch.no_grad():
        assert model.module(pixels).shape == (2, 17, 64)
