"""The long tail on small random Hugging Face configs, as a user compiles them: both exporters,
dynamic (with the KV cache) and ``--static`` (no cache) exports; every site fused or listed with
its reason, verified against PyTorch on padded inputs, and run in ORT at other sizes."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from txcompile import api
from txcompile.graph import inputs as model_inputs
from txcompile.graph import ort as rt

os.environ.setdefault("HF_HUB_OFFLINE", "1")
pytest.importorskip("txcompile.exporters")

HF = Path(__file__).resolve().parents[1] / "data" / "hf"
OTHER_DIMS = {"batch": 3, "seq": 24}

# family → the export's opset, compile flags, the rules each pass must apply, ops that may stay
CASES = {
    # ALiBi inside baddbmm over [B·N]-folded heads; BLOOM's own tanh-GELU arrangement
    "bloom": {
        "rules": {"fuse-attention": {"split-folded-heads": 2}, "fuse-activations": {"gelu-by-value": 2}},
    },
    # DeBERTa-v2's c2p and p2c terms, added to the scores over folded heads: one additive bias
    "deberta": {"rules": {"fuse-attention": {"split-folded-heads": 2}}},
    # gelu_pytorch_tanh below opset 20, where no exporter writes ONNX Gelu
    "gemma": {"opset": 18},
    # GPT-J's interleaved partial rotary (8 of 16 dims), rotated as [B, S, N, D]
    "gptj": {"rules": {"fuse-rotary": {"rotary-interleaved": 4}}},
    # RoPE; a static export folds cos/sin into constants, read by their values
    "llama": {"rules": {"fuse-rotary": {"rotary-embedding": 4}}},
    # soft-capped attention (ONNX Attention's softcap) with sliding-window layers; the final
    # logit soft-cap is a Tanh that stays
    "gemma2": {
        "flags": {"attention_op": "onnx"},
        "rules": {"fuse-attention": {"onnx-attention": 2}},
        "left": {"Tanh"},
    },
}


def compile_family(family: str, exporter: str, dynamic: bool):
    case = CASES[family]
    task = None if dynamic else "feature-extraction"  # a KV cache grows: no static decoder
    torch_model, result, dims = api.export(
        str(HF / family), task=task, opset=case.get("opset"), exporter=exporter, dynamic=dynamic
    )
    config = api.settings(dims=dims, **case.get("flags", {}))
    return result.model, api.compile_exported(torch_model, result, config)


@pytest.mark.slow
@pytest.mark.parametrize("dynamic", [True, False], ids=["dynamic", "static"])
@pytest.mark.parametrize("exporter", ["dynamo", "torchscript"])
@pytest.mark.parametrize("family", CASES)
def test_family_fuses_its_variants(family, exporter, dynamic):
    exported, compiled = compile_family(family, exporter, dynamic)
    report = compiled.report
    records = {r["name"]: r for r in report["passes"]}
    assert report["verification"]["passed"] and report["verification"]["reference"] == "pytorch"
    assert report["verification"]["max_diff"] <= 1e-4
    for name, rules in CASES[family].get("rules", {}).items():
        for rule, count in rules.items():
            assert records[name]["rule_counts"].get(rule) == count, (name, records[name]["rule_counts"])
    attention = records["fuse-attention"]["details"]
    assert attention["unfused"] == 0, [s for s in attention["sites"] if s["status"] != "fused"]
    ops = report["ops"]["after"]
    left = {"Softmax", "Tanh", "Erf"} & set(ops) - CASES[family].get("left", set())
    assert not left, ops
    if dynamic:  # other sizes than the verification's, padded: the fused graph against the export,
        # on real tokens as verification counts them (a padding query attends to nothing)
        feeds = model_inputs.make_feeds(model_inputs.read_specs(exported), OTHER_DIMS, seed=3)
        assert (feeds["attention_mask"] == 0).any(), "the check needs padded inputs"
        before = rt.run(rt.create_session(exported), feeds)
        after = rt.run(rt.create_session(compiled.model), feeds)
        assert rt.max_abs_diff(before, after, rt.padded_rows(exported, feeds)) < 1e-4
        assert all(np.isfinite(v).all() for v in after.values())


@pytest.mark.slow
@pytest.mark.parametrize("exporter", ["dynamo", "torchscript"])
def test_soft_capped_decoder_becomes_group_query_attention(exporter):
    """GroupQueryAttention caps the scores itself (softcap) and appends to the KV cache."""
    torch_model, result, dims = api.export(str(HF / "gemma2"), exporter=exporter)
    compiled = api.compile_exported(torch_model, result, api.settings(dims=dims, attention_op="gqa"))
    report = compiled.report
    assert report["verification"]["passed"] and report["verification"]["decode_steps"]["steps"] > 0
    attention = next(r for r in report["passes"] if r["name"] == "fuse-attention")
    assert attention["rule_counts"]["gqa"] == 2, attention["details"]["sites"]
    nodes = [n for n in compiled.model.graph.node if n.op_type == "GroupQueryAttention"]
    assert [next(a.f for a in n.attribute if a.name == "softcap") for n in nodes] == [1.0, 1.0]
