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

# family → (opset, the rules each pass must have applied)
CASES = {
    # ALiBi inside baddbmm over [B·N]-folded heads; BLOOM's own tanh-GELU arrangement
    "bloom": (None, {"fuse-attention": {"split-folded-heads": 2}, "fuse-activations": {"gelu-by-value": 2}}),
    # DeBERTa-v2's c2p and p2c terms, added to the scores over folded heads: one additive bias
    "deberta": (None, {"fuse-attention": {"split-folded-heads": 2}}),
    # gelu_pytorch_tanh below opset 20, where no exporter writes ONNX Gelu
    "gemma": (18, {}),
}


def compile_family(family: str, exporter: str, dynamic: bool):
    opset, _ = CASES[family]
    task = None if dynamic else "feature-extraction"  # a KV cache grows: no static decoder
    torch_model, result, dims = api.export(
        str(HF / family), task=task, opset=opset, exporter=exporter, dynamic=dynamic
    )
    return result.model, api.compile_exported(torch_model, result, api.settings(dims=dims))


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
    for name, rules in CASES[family][1].items():
        for rule, count in rules.items():
            assert records[name]["rule_counts"].get(rule) == count, (name, records[name]["rule_counts"])
    attention = records["fuse-attention"]["details"]
    assert attention["unfused"] == 0, [s for s in attention["sites"] if s["status"] != "fused"]
    ops = report["ops"]["after"]
    assert "Softmax" not in ops and "Tanh" not in ops and "Erf" not in ops, ops
    if dynamic:  # other sizes than the verification's, padded: the fused graph against the export
        feeds = model_inputs.make_feeds(model_inputs.read_specs(exported), OTHER_DIMS, seed=3)
        assert (feeds["attention_mask"] == 0).any(), "the check needs padded inputs"
        before = rt.run(rt.create_session(exported), feeds)
        after = rt.run(rt.create_session(compiled.model), feeds)
        assert rt.max_abs_diff(before, after) < 1e-4
        assert all(np.isfinite(v).all() for v in after.values())
