"""Golden tests per model family: every attention site fused, outputs unchanged, runs in ORT CPU.

The built-in tiny models run by default; the Hugging Face matrix (10 families × 2 exporters ×
eager/sdpa) is marked slow. Each export is checked at other sizes than the verification ones
(batch 3, sequence 24, padded) so nothing the fusion read from the probe is baked in.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnx
import pytest

from txcompile import compiler
from txcompile.graph import inputs as model_inputs
from txcompile.graph import ort as rt
from txcompile.graph.errors import TxError
from txcompile.pipelines import CLEANUP

os.environ.setdefault("HF_HUB_OFFLINE", "1")
exporters = pytest.importorskip("txcompile.exporters")

HF = Path(__file__).resolve().parents[1] / "data" / "hf"
PASSES = [*CLEANUP, "fuse-norms", "fuse-embed-layernorm", "fuse-rotary", "fuse-attention", "fuse-activations"]
OTHER_DIMS = {"batch": 3, "seq": 24}

# family → attention sites in its tiny config (BART: encoder self, decoder self and cross)
SITES = {
    "tiny-bert": 2,
    "tiny-llama": 2,
    "tiny-vit": 2,
    "bert": 2,
    "roberta": 2,
    "distilbert": 2,
    "gpt2": 2,
    "llama": 2,
    "vit": 2,
    "swin": 4,
    "t5-encoder": 2,
    "whisper-encoder": 2,
    "bart": 6,
}
# RoPE sites (Q and K of each layer) fuse-rotary turns into RotaryEmbedding
ROTARY = {"tiny-llama": 4, "llama": 4}
# embedding blocks (lookups summed, then LayerNorm) fuse-embed-layernorm turns into one op
EMBED = {"tiny-bert": 1, "bert": 1, "roberta": 1, "distilbert": 1, "gpt2": 1, "bart": 2}
# ...of which these stay unfused: TorchScript's BART encoder also reads its token embeddings
# through a Gather (inputs_embeds[:, :, -1]), so the lookup is not private to the block
EMBED_LEFT = {("bart", "torchscript"): 1}
# activations each family's export leaves to fuse-activations (LLaMA's SiLU has no fused kernel)
ACTIVATIONS = {"tiny-bert": "bias-gelu", "bert": "bias-gelu", "gpt2": "gelu-tanh-half", "vit": "bias-gelu"}


def _export(family: str, exporter: str, attn: str | None) -> onnx.ModelProto:
    spec = family if family.startswith("tiny-") else str(HF / family)
    torch_model = exporters.load_model_spec(spec, attn_implementation=attn)
    try:
        return exporters.export_onnx(torch_model, exporter=exporter).model
    except TxError as err:
        pytest.skip(f"the {exporter} exporter cannot export {family} ({attn}): {err}")


def check_family(family: str, exporter: str, attn: str | None = None) -> dict:
    model = _export(family, exporter, attn)
    outcome = compiler.optimize(model, compiler.Settings(passes=PASSES), source=family, output="fused.onnx")
    records = {r["name"]: r for r in outcome.report["passes"]}
    attention = records["fuse-attention"]
    assert attention["status"] == "applied", attention["reason"]
    details = attention["details"]
    assert details["unfused"] == 0, [s for s in details["sites"] if s["status"] != "fused"]
    assert details["fused"] == SITES[family]
    ops = outcome.report["ops"]["after"]
    fused_ops = sum(
        ops.get(op, 0) for op in ("com.microsoft.MultiHeadAttention", "com.microsoft.Attention", "Attention")
    )
    assert fused_ops == SITES[family]
    assert "Softmax" not in ops
    feeds = model_inputs.make_feeds(model_inputs.read_specs(model), OTHER_DIMS, seed=3)
    if "attention_mask" in feeds:
        assert (feeds["attention_mask"] == 0).any(), "the check needs padded inputs"
    before = rt.run(rt.create_session(model), feeds)
    after = rt.run(rt.create_session(outcome.model), feeds)
    assert rt.max_abs_diff(before, after) < 1e-4
    assert all(np.isfinite(v).all() for v in after.values())
    rotary = records["fuse-rotary"]["details"]
    assert (rotary["fused"], rotary["unfused"]) == (ROTARY.get(family, 0), 0), rotary["sites"]
    assert ops.get("com.microsoft.RotaryEmbedding", 0) == ROTARY.get(family, 0)
    embed = records["fuse-embed-layernorm"]["details"]
    left = EMBED_LEFT.get((family, exporter), 0)
    assert (embed["fused"], embed["unfused"]) == (EMBED.get(family, 0) - left, left), embed["sites"]
    if family in ACTIVATIONS:
        assert records["fuse-activations"]["rule_counts"].get(ACTIVATIONS[family]) == 2
    return outcome.report


@pytest.mark.parametrize("family", ["tiny-bert", "tiny-llama", "tiny-vit"])
def test_builtin_torchscript(family):
    check_family(family, "torchscript")


def test_builtin_bert_dynamo():
    report = check_family("tiny-bert", "dynamo")
    rules = next(r for r in report["passes"] if r["name"] == "fuse-attention")["rule_counts"]
    # Q, K, V project one input: one packed-QKV Attention per layer, biases and mask folded in
    assert rules == {"attention-packed-qkv": 2, "fold-projection-bias": 2, "attention-bias": 1}


HF_CASES = [
    (family, exporter, attn)
    for family in (
        "bert",
        "roberta",
        "distilbert",
        "gpt2",
        "llama",
        "vit",
        "swin",
        "t5-encoder",
        "whisper-encoder",
        "bart",
    )
    for exporter in ("dynamo", "torchscript")
    for attn in ("eager", "sdpa")
]


@pytest.mark.slow
@pytest.mark.parametrize(("family", "exporter", "attn"), HF_CASES)
def test_hugging_face(family, exporter, attn):
    check_family(family, exporter, attn)
