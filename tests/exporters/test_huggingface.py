"""Local Hugging Face folders (tests/data/hf): loading, inputs per family, export and numerics."""

from __future__ import annotations

import json

import pytest
import torch

from txcompile.exporters import export_onnx, load_model_spec
from txcompile.graph.errors import TxError

from .conftest import HF_DATA, ort_vs_torch

pytestmark = pytest.mark.slow

OTHER_DIMS = {"batch": 3, "seq": 9}


CACHE = [f"{i}.{kind}" for i in range(2) for kind in ("key", "value")]
DECODER_INPUTS = ["input_ids", "attention_mask", "position_ids", *(f"past_key_values.{c}" for c in CACHE)]
DECODER_OUTPUTS = ["logits", *(f"present.{c}" for c in CACHE)]


@pytest.mark.parametrize(
    ("name", "inputs", "outputs"),
    [
        ("bert", ["input_ids", "attention_mask"], ["last_hidden_state"]),
        ("gpt2", DECODER_INPUTS, DECODER_OUTPUTS),  # causal LMs: one graph for prefill and decode
        ("llama", DECODER_INPUTS, DECODER_OUTPUTS),
    ],
)
def test_core_families_export_with_dynamo(name, inputs, outputs):
    folder = HF_DATA / name
    model = load_model_spec(str(folder))
    assert model.warnings == [f"no weights in {folder}: random init (seed 0)"]
    assert model.input_names == inputs
    assert model.output_names == outputs
    result = export_onnx(model)
    assert result.exporter == "dynamo" and result.fallback_reason is None, result.fallback_reason
    assert result.max_diff < 1e-4
    assert ort_vs_torch(result, model, OTHER_DIMS) < 1e-4


def test_whisper_inputs():
    model = load_model_spec(str(HF_DATA / "whisper"))
    features, decoder_ids = model.inputs
    assert features.shape == ("batch", 16, 64) and features.kind == "normal"
    assert decoder_ids.shape == ("batch", "decoder_seq") and decoder_ids.high == 1000
    assert model.example_inputs()["decoder_input_ids"].shape == (2, 8)


def test_attn_implementation_is_passed_on():
    model = load_model_spec(str(HF_DATA / "llama"), attn_implementation="eager")
    assert model.module.model.config._attn_implementation == "eager"
    with pytest.raises(TxError, match="unknown attn_implementation 'flash': choose eager, sdpa"):
        load_model_spec(str(HF_DATA / "llama"), attn_implementation="flash")


def test_weights_are_loaded(tmp_path):
    """A folder with model.safetensors loads them: no warning, same numbers as the saved model."""
    source = load_model_spec(str(HF_DATA / "bert")).module.model
    with torch.no_grad():
        for parameter in source.parameters():
            parameter.add_(0.01)
    source.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").is_file()
    model = load_model_spec(str(tmp_path))
    assert model.warnings == []
    for (key, a), b in zip(
        source.state_dict().items(), model.module.model.state_dict().values(), strict=True
    ):
        assert torch.equal(a, b), key


def test_checkpoint_missing_head_and_unknown_architecture(tmp_path):
    load_model_spec(str(HF_DATA / "bert")).module.model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "architectures": ["BertForMaskedLM"]}))
    model = load_model_spec(str(tmp_path))
    assert model.output_names == ["logits"]
    assert any("not in the checkpoint, random init" in w for w in model.warnings), model.warnings
    (tmp_path / "config.json").write_text(json.dumps({**config, "architectures": ["MyOwnBert"]}))
    model = load_model_spec(str(tmp_path))
    assert model.warnings == ["transformers has no MyOwnBert: using BertModel"]
