"""preln-to-rmsnorm: Pre-LN graphs convert exactly; Post-LN and graphs that read the stream are refused."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from tests.norms import models

D, V, S = 8, 20, 16
RNG = np.random.default_rng(1)
CENTERING = ("center-writer", "center-explicitly")  # the centering rules (once details["centered"])


def _init(name, shape, scale=0.5, offset=0.0):
    return numpy_helper.from_array((offset + scale * RNG.standard_normal(shape)).astype(np.float32), name)


def pre_ln_model(
    stream_reader: str | None = None, stream_output: bool = False, gelu_stem: bool = False, opset: int = 20
) -> onnx.ModelProto:
    """tokens + positions → [LN → MLP → +] → LN; optionally a Relu or a graph output reads the stream.

    ``gelu_stem`` puts a Gelu after the token lookup, a write no weight can absorb (as Whisper's
    conv → Gelu stem). Below opset 20, which has no Gelu, the MLP's activation is a Relu.
    """
    activation = "Gelu" if opset >= 20 else "Relu"
    lookup = "tok_raw" if gelu_stem else "tok"
    nodes = [
        helper.make_node("Gather", ["wte", "input_ids"], [lookup]),
        *([helper.make_node("Gelu", ["tok_raw"], ["tok"])] if gelu_stem else []),
        helper.make_node("Gather", ["wpe", "position_ids"], ["pos"]),
        helper.make_node("Add", ["tok", "pos"], ["h0"]),
        helper.make_node("LayerNormalization", ["h0", "g1", "b1"], ["n1"], axis=-1, epsilon=1e-5),
        helper.make_node("MatMul", ["n1", "w1"], ["m1"]),
        helper.make_node("Add", ["m1", "c1"], ["a1"]),
        helper.make_node(activation, ["a1"], ["act"]),
        helper.make_node("MatMul", ["act", "w2"], ["m2"]),
        helper.make_node("Add", ["m2", "c2"], ["write"]),
        helper.make_node("Add", ["h0", "write"], ["h1"]),
        helper.make_node("LayerNormalization", ["h1", "g2", "b2"], ["y"], axis=-1, epsilon=1e-5),
    ]
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", "seq", D])]
    if stream_reader:
        nodes.append(helper.make_node(stream_reader, ["h1"], ["other"]))
        outputs.append(helper.make_tensor_value_info("other", TensorProto.FLOAT, ["batch", "seq", D]))
    if stream_output:
        outputs.append(helper.make_tensor_value_info("h1", TensorProto.FLOAT, ["batch", "seq", D]))
    initializers = [
        _init("wte", (V, D), offset=0.3),
        _init("wpe", (S, D), offset=-0.2),
        _init("g1", (D,), 0.1, 1.0),
        _init("b1", (D,), 0.1),
        _init("w1", (D, 2 * D)),
        _init("c1", (2 * D,), 0.1),
        _init("w2", (2 * D, D)),
        _init("c2", (D,), 0.1, 0.5),
        _init("g2", (D,), 0.1, 1.0),
        _init("b2", (D,), 0.1),
    ]
    graph = helper.make_graph(
        nodes,
        "pre_ln",
        [
            helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "seq"]),
            helper.make_tensor_value_info("position_ids", TensorProto.INT64, ["batch", "seq"]),
        ],
        outputs,
        initializers,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 9
    return model


def convert(model, passes=("preln-to-rmsnorm",)):
    out, records = models.optimize(model, list(passes))
    return out, records["preln-to-rmsnorm"]


def test_pre_ln_graph_converts_exactly():
    out, record = convert(pre_ln_model())
    assert record["status"] == "applied", record["details"]
    assert record["rule_counts"]["layer-norm-to-rms-norm"] == 2
    assert models.ops(out).get("RMSNormalization") == 2 and "LayerNormalization" not in models.ops(out)
    assert record["max_diff"] <= 1e-5
    centered = {(c["what"]) for c in models.fused(record, *CENTERING)}
    assert {"embedding table", "projection weight"} <= centered


def test_pre_ln_graph_at_opset_17_is_converted_to_opset_23():
    out, record = convert(pre_ln_model(opset=17))
    assert record["status"] == "applied", record["details"]
    assert record["rule_counts"]["layer-norm-to-rms-norm"] == 2
    assert (
        record["details"]["opset"] == "converted the graph from ONNX opset 17 to 23 (onnx version converter)"
    )
    assert next(o.version for o in out.opset_import if o.domain == "") == 23
    assert record["max_diff"] <= 1e-5


def test_non_linear_stem_is_centered_explicitly():
    out, record = convert(pre_ln_model(gelu_stem=True))
    assert record["status"] == "applied", record["details"]
    assert record["rule_counts"]["center-explicitly"] == 1
    assert record["max_diff"] <= 1e-5
    assert any("explicit" in c["what"] for c in models.fused(record, *CENTERING))


def test_norm_over_tokens_merged_along_the_hidden_axis_is_refused():
    """Swin's patch merging: a LayerNorm over concatenated tokens would see the removed shifts."""
    model = pre_ln_model()
    model.graph.node.append(helper.make_node("Concat", ["h1", "h1"], ["merged"], axis=-1))
    model.graph.node.append(helper.make_node("LayerNormalization", ["merged", "g_wide"], ["wide"], axis=-1))
    model.graph.initializer.append(_init("g_wide", (2 * D,), 0.1, 1.0))
    model.graph.output.append(
        helper.make_tensor_value_info("wide", TensorProto.FLOAT, ["batch", "seq", 2 * D])
    )
    out, record = convert(model)
    assert "concatenates along the hidden axis" in record["details"]["refused"]
    assert "RMSNormalization" not in models.ops(out)


@pytest.mark.parametrize("reader", ["Relu", None])
def test_stream_read_elsewhere_is_refused(reader):
    out, record = convert(pre_ln_model(stream_reader=reader, stream_output=reader is None))
    assert record["status"] == "unchanged"
    reason = record["details"]["refused"]
    assert ("also read by Relu" in reason) if reader else ("graph output" in reason)
    assert "RMSNormalization" not in models.ops(out)


def test_refused_after_skip_fusion():
    from tests.norms.test_fuse_norms import fuse

    skipped, _ = fuse(pre_ln_model(), device="cuda")  # the Skip norms CUDA gets
    assert "SkipLayerNormalization" in models.ops(skipped)
    _, record = convert(skipped)
    assert "before fuse-norms" in record["details"]["refused"]
    # on the CPU fuse-norms keeps Add + LayerNormalization, so the conversion still applies after it
    _, record = convert(pre_ln_model(), passes=("fuse-norms", "preln-to-rmsnorm"))
    assert record["status"] == "applied", record["details"]


def check_family(family, exporter, opset=None):
    model = models.exported(family, exporter, opset)
    out, records = models.optimize(model, ["preln-to-rmsnorm", "fuse-norms"])
    record = records["preln-to-rmsnorm"]
    assert record["status"] == "applied", record["details"].get("refused") or record["reason"]
    assert record["rule_counts"]["layer-norm-to-rms-norm"] == 5
    assert record["max_diff"] <= 1e-4
    ops = models.ops(out)
    assert "LayerNormalization" not in ops and "SkipLayerNormalization" not in ops
    assert records["fuse-norms"]["status"] == "applied"
    assert records["fuse-norms"]["rule_counts"].get("skip-rms-norm", 0) >= 1
    return out


@pytest.mark.parametrize("family", ["gpt2", "vit"])
def test_family_converts(family):
    check_family(family, "torchscript")


def test_family_at_opset_14_converts():
    """TorchScript's LayerNorm below opset 17 is decomposed: fused (opset 17), then converted to 23."""
    out = check_family("gpt2", "torchscript", 14)
    assert next(o.version for o in out.opset_import if o.domain == "") == 23


@pytest.mark.slow
@pytest.mark.parametrize("family", ["gpt2", "vit"])
def test_family_converts_dynamo(family):
    check_family(family, "dynamo")


def test_post_ln_bert_is_refused():
    out, records = models.optimize(models.exported("bert", "torchscript"), ["preln-to-rmsnorm"])
    record = records["preln-to-rmsnorm"]
    assert record["status"] == "unchanged"
    assert "Post-LN" in record["details"]["refused"]
    assert "RMSNormalization" not in models.ops(out)


def test_refused_graph_below_opset_18_is_not_converted():
    out, records = models.optimize(models.exported("bert", "torchscript", 14), ["preln-to-rmsnorm"])
    record = records["preln-to-rmsnorm"]
    assert "Post-LN" in record["details"]["refused"]
    # only what the decomposed LayerNorm fusion needs: opset 17, no conversion to 23
    assert next(o.version for o in out.opset_import if o.domain == "") == 17
    assert record["details"]["opset"] == "raised the ONNX opset from 14 to 17"


def test_rms_norm_llama_is_left_alone():
    _, records = models.optimize(models.exported("llama", "torchscript"), ["preln-to-rmsnorm"])
    assert "no LayerNormalization" in records["preln-to-rmsnorm"]["details"]["refused"]
