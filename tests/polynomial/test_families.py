"""The he pipeline end to end on every family the exporters support (random weights)."""

from __future__ import annotations

import onnx_ir as ir
import pytest

from txcompile import compiler
from txcompile.exporters import export_onnx, load_model_spec
from txcompile.graph.ckks import violations


def _he(spec: str, task: str | None = None, **options):
    torch_model = load_model_spec(spec, task=task)
    exported = export_onnx(torch_model, dims={"batch": 2, "seq": 16}, dynamic=False)
    settings = compiler.Settings(target="he", flags=options)
    return compiler.optimize(exported.model, settings, source=spec, output="unused.onnx")


def _record(outcome, name):
    return next(p for p in outcome.report["passes"] if p["name"] == name)


@pytest.mark.parametrize(
    ("spec", "kinds", "drift"),
    [
        ("tiny-bert", {"Gelu", "Softmax", "LayerNorm"}, 0.02),
        ("tiny-llama", {"Sigmoid", "Softmax", "invsqrt"}, 0.02),
        ("tiny-vit", {"Gelu", "Softmax", "LayerNorm"}, 0.05),
    ],
)
def test_builtin_family_becomes_polynomial(spec, kinds, drift):
    outcome = _he(spec)
    polynomial = _record(outcome, "he-polynomial")
    assert polynomial["status"] == "applied" and not polynomial["exact"]
    assert set(polynomial["details"]["per_nonlinearity"]) == kinds
    assert polynomial["max_diff"] < drift
    assert _record(outcome, "he-contract")["status"] == "unchanged"
    assert violations(ir.serde.deserialize_model(outcome.model).graph) == []
    depth = _record(outcome, "he-depth")["details"]
    assert depth["depth"] > 0 and depth["multiplications"]["ct×ct"] > 0


@pytest.mark.slow
def test_gpt2_tanh_gelu_and_causal_mask():
    outcome = _he("tests/data/hf/gpt2", task="feature-extraction")  # one forward, no cache
    polynomial = _record(outcome, "he-polynomial")
    assert {"Tanh", "Softmax", "LayerNorm"} == set(polynomial["details"]["per_nonlinearity"])
    assert polynomial["rule_counts"]["nan-guard"] == 2
    assert polynomial["max_diff"] < 0.02
    assert violations(ir.serde.deserialize_model(outcome.model).graph) == []


def test_power_softmax_mode_states_its_cost():
    outcome = _he("tiny-bert", he_mode="power-softmax")
    sites = _record(outcome, "he-polynomial")["details"]["sites"]
    softmax = [s for s in sites if s["kind"] == "Softmax"]
    assert softmax and all(s["rule"] == "power-softmax" and "accuracy_cost_vs_softmax" in s for s in softmax)
