"""--attention-op gqa: causal sites become GroupQueryAttention with K/V at their own head count."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest

from txcompile import compiler
from txcompile.exporters import export_onnx, load_model_spec
from txcompile.graph import inputs, kernels
from txcompile.graph import ort as rt
from txcompile.passes.base import PassContext
from txcompile.passes.targets.kernel_check import missing_kernels
from txcompile.passes.targets.precision import Precision

DIMS = {"batch": 2, "seq": 16}
HF = Path(__file__).resolve().parents[1] / "data" / "hf"
GQA = "com.microsoft.GroupQueryAttention"


@pytest.fixture(scope="module")
def llama() -> onnx.ModelProto:
    return export_onnx(load_model_spec("tiny-llama"), dims=DIMS).model


@pytest.fixture(scope="module")
def llama_gqa(llama):
    return _gqa(llama)


def _gqa(model: onnx.ModelProto, npz: str | None = None):
    settings = compiler.Settings(target="cpu", inputs_npz=npz, flags={"attention_op": "gqa"})
    outcome = compiler.optimize(model, settings, source="test", output="unused.onnx")
    fusion = next(p for p in outcome.report["passes"] if p["name"] == "fuse-attention")
    return outcome, fusion["details"]["sites"]


def _nodes(model: onnx.ModelProto, op: str) -> list[onnx.NodeProto]:
    return [n for n in model.graph.node if n.op_type == op]


def test_llama_sites_become_gqa_with_their_own_kv_heads(llama_gqa):
    outcome, sites = llama_gqa
    assert [s["op"] for s in sites] == [GQA, GQA]
    assert outcome.passed and outcome.report["verification"]["max_diff"] < 1e-4  # padded rows included
    for node in _nodes(outcome.model, "GroupQueryAttention"):
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        assert attrs["num_heads"] == 4 and attrs["kv_num_heads"] == 2  # the repeat is gone
    assert not _nodes(outcome.model, "Expand")  # neither the KV repetition nor a mask is left


def test_on_the_cpu_llama_sites_are_onnx_attention_without_the_repeat(llama):
    outcome = compiler.optimize(llama, compiler.Settings(target="cpu"), source="test", output="unused.onnx")
    sites = next(p for p in outcome.report["passes"] if p["name"] == "fuse-attention")["details"]["sites"]
    assert [(s["rule"], s["op"]) for s in sites] == [("onnx-attention-bsh", "Attention")] * 2
    assert outcome.passed and outcome.report["verification"]["max_diff"] < 1e-4  # padded rows included
    for node in _nodes(outcome.model, "Attention"):
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        assert attrs["q_num_heads"] == 4 and attrs["kv_num_heads"] == 2
    repeats = 2 * len(sites)  # K's and V's Expand in each layer go; the causal mask's stays
    assert len(_nodes(outcome.model, "Expand")) == len(_nodes(llama, "Expand")) - repeats == 1


@pytest.mark.slow
@pytest.mark.parametrize(
    "family,exporter,kv_heads",
    [("llama", "torchscript", 2), ("gpt2", "dynamo", 4), ("gpt2", "torchscript", 4)],
)
def test_hugging_face_decoders(family, exporter, kv_heads):
    """The decoder stacks without their cache (feature-extraction): one causal forward."""
    spec = load_model_spec(str(HF / family), task="feature-extraction")
    model = export_onnx(spec, dims=DIMS, exporter=exporter).model
    outcome, sites = _gqa(model)
    assert sites and all(s["op"] == GQA for s in sites)
    assert outcome.passed
    for node in _nodes(outcome.model, "GroupQueryAttention"):
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        assert attrs["kv_num_heads"] == kv_heads


@pytest.mark.slow
def test_decoder_without_a_padding_mask_takes_lengths_from_the_keys():
    """Whisper: the decoder's self-attention is causal only; encoder and cross-attention stay MHA."""
    model = export_onnx(load_model_spec(str(HF / "whisper")), dims=DIMS).model
    outcome, sites = _gqa(model)
    assert sum(s["op"] == GQA for s in sites) == 2
    assert all(s["note"] == "not GroupQueryAttention: no causal mask" for s in sites if s["op"] != GQA)
    assert outcome.passed


def test_fp16_gqa_has_cuda_kernels(llama_gqa):
    outcome, _ = llama_gqa
    working = ir.serde.deserialize_model(outcome.model)
    tx_pass = Precision(PassContext("gpu", "cuda", {}, {}))
    tx_pass(working)
    assert tx_pass.details["low_ops"][GQA] == 2
    assert missing_kernels(working, kernels.cuda_table())[1] == []


def test_gqa_in_fp16_stays_close_on_the_cpu_ep(llama, llama_gqa):
    """The CPU EP has no fp16 MatMul, so only the GroupQueryAttention ops run in fp16 here."""
    outcome, _ = llama_gqa
    working = ir.serde.deserialize_model(outcome.model)
    for node in [n for n in working.graph if n.op_type == "GroupQueryAttention"]:
        for i in range(3):
            cast = ir.node("Cast", [node.inputs[i]], {"to": ir.DataType.FLOAT16})
            working.graph.insert_before(node, cast)
            node.replace_input_with(i, cast.outputs[0])
        output = node.outputs[0]
        back = ir.node("Cast", [output], {"to": ir.DataType.FLOAT})
        output.replace_all_uses_with(back.outputs[0])
        back.replace_input_with(0, output)
        working.graph.insert_after(node, back)
        output.dtype = ir.DataType.FLOAT16
    feeds = inputs.make_feeds(inputs.read_specs(llama), DIMS)
    half = rt.run(rt.create_session(ir.serde.serialize_model(working)), feeds)
    full = rt.run(rt.create_session(outcome.model), feeds)
    assert 0 < rt.max_abs_diff(half, full) < 2e-2


def test_encoder_padding_mask_is_not_causal_and_stays_mha():
    model = export_onnx(load_model_spec("tiny-bert"), dims=DIMS).model
    outcome, sites = _gqa(model)
    assert all(
        s["op"] != GQA and s["note"] == "not GroupQueryAttention: mask is not causal ∧ padding" for s in sites
    )
    assert outcome.passed


def test_left_padded_verification_inputs_are_refused(llama, tmp_path):
    """GroupQueryAttention reads padding as a length per row: only right padding means that."""
    feeds = inputs.make_feeds(inputs.read_specs(llama), DIMS)
    feeds["attention_mask"] = feeds["attention_mask"][:, ::-1].copy()
    np.savez(tmp_path / "left.npz", **feeds)
    outcome, sites = _gqa(llama, str(tmp_path / "left.npz"))
    assert all(s["op"] == "Attention" for s in sites)  # the CPU's form for LLaMA's repeated K/V
    assert "not right-padded" in sites[0]["note"] and outcome.passed
