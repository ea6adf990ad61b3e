"""Local Hugging Face folders (tests/data/hf): loading, inputs per family, export and numerics."""

from __future__ import annotations

import json

import pytest
import torch

from txcompile import api
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


def _windowed(tmp_path, window: int):
    config = json.loads((HF_DATA / "gemma2" / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "sliding_window": window}))
    return tmp_path


def test_a_short_sliding_window_is_verified_past(tmp_path):
    """Gemma 2 attends within 24 tokens on alternate layers: verification runs 32, past it."""
    torch_model, result, dims = api.export(_windowed(tmp_path, 24), task="feature-extraction")
    assert torch_model.window == 24 and dims["seq"] == 32
    assert not [w for w in torch_model.warnings if "sliding window" in w]
    compiled = api.compile_exported(torch_model, result, api.settings(dims=dims, attention_op="onnx"))
    assert compiled.report["verification"]["inputs"]["input_ids"]["shape"] == [2, 32]
    assert compiled.passed


def test_a_long_sliding_window_is_said_unless_seq_passes_it(tmp_path):
    folder = _windowed(tmp_path, 600)  # past the 512 tokens verification goes to by itself
    torch_model, _, dims = api.export(folder, task="feature-extraction")
    assert dims["seq"] == 16
    said = f"{folder}: verification runs 16 tokens, inside the 600-token sliding window"
    said += "; --seq 608 verifies past it"
    assert said in torch_model.warnings
    torch_model, _, _ = api.export(folder, task="feature-extraction", dims={"seq": 608})
    assert not [w for w in torch_model.warnings if "sliding window" in w]
