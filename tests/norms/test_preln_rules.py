"""preln-to-rmsnorm, rule by rule: a match, a non-match with its reason, a shared value."""

from __future__ import annotations

import numpy as np
from onnx import TensorProto, helper, numpy_helper

from tests.norms import models
from tests.norms.test_fuse_norms import build, layer_norm_nodes
from tests.norms.test_preln_rmsnorm import D, convert, pre_ln_model

XS = ["batch", "seq", D]
TO_RMS = "layer-norm-to-rms-norm"


def output(model, name, shape=XS):
    model.graph.output.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, shape))


def applied(record):
    assert record["status"] == "applied", record["details"]
    assert record["max_diff"] <= 1e-5


def refused(record) -> str:
    """The refusal, which every LayerNorm's site repeats; no centering happened."""
    assert record["status"] == "unchanged"
    reason = record["details"]["refused"]
    assert [s["reason"] for s in models.unfused(record, TO_RMS)] == [reason, reason]
    assert not models.fused(record, "center-writer", "center-explicitly")
    return reason


# --- center-writer ---------------------------------------------------------------------------


def test_center_writer_centers_tables_weights_and_biases():
    _, record = convert(pre_ln_model())
    applied(record)
    sites = models.fused(record, "center-writer")
    assert {s["what"] for s in sites} == {"embedding table", "projection weight", "constant"}
    assert record["rule_counts"]["center-writer"] == len(sites)
    assert {s["op"] for s in sites} == {"Gather", "MatMul", "Add"}


def test_center_writer_with_the_stream_read_elsewhere_is_refused():
    _, record = convert(pre_ln_model(stream_reader="Relu"))
    assert "h1 (residual stream) is also read by Relu" in refused(record)


def test_center_writer_leaves_a_shared_weight_intact_for_its_other_reader():
    model = pre_ln_model()
    model.graph.node.append(helper.make_node("MatMul", ["a1", "w2"], ["side"]))
    output(model, "side")
    w2 = next(numpy_helper.to_array(i) for i in model.graph.initializer if i.name == "w2")
    out, record = convert(model)
    applied(record)
    side = next(n for n in out.graph.node if n.output[0] == "side")
    weight = next(numpy_helper.to_array(i) for i in out.graph.initializer if i.name == side.input[1])
    np.testing.assert_array_equal(weight, w2)  # copy on write: the centered copy is the stream's own


# --- center-explicitly -----------------------------------------------------------------------


def test_center_explicitly_centers_a_gelu_stem():
    out, record = convert(pre_ln_model(gelu_stem=True))
    applied(record)
    [site] = models.fused(record, "center-explicitly")
    assert site["op"] == "ReduceMean + Sub" and "Gelu" in site["what"]
    assert record["rule_counts"]["center-explicitly"] == 1


def test_center_explicitly_refuses_a_write_broadcast_along_the_hidden_axis():
    model = pre_ln_model()
    add = next(n for n in model.graph.node if n.output[0] == "h0")
    add.output[0] = "h00"
    model.graph.node.insert(
        list(model.graph.node).index(add) + 1, helper.make_node("Add", ["h00", "s"], ["h0"])
    )
    model.graph.input.append(helper.make_tensor_value_info("s", TensorProto.FLOAT, ["batch", "seq", 1]))
    _, record = convert(model)
    assert "s is broadcast along the hidden axis into Add" in refused(record)


def test_center_explicitly_leaves_the_stem_uncentered_for_its_other_reader():
    model = pre_ln_model(gelu_stem=True)
    model.graph.node.append(helper.make_node("Neg", ["tok"], ["tok_neg"]))
    output(model, "tok_neg")
    out, record = convert(model)
    applied(record)
    assert len(models.fused(record, "center-explicitly")) == 1
    gelu = next(n for n in out.graph.node if n.op_type == "Gelu")
    neg = next(n for n in out.graph.node if n.op_type == "Neg")
    assert neg.input[0] == gelu.output[0]  # the centered copy goes into the stream only


# --- layer-norm-to-rms-norm ------------------------------------------------------------------


def test_layer_norm_to_rms_norm_folds_or_keeps_each_shift():
    _, record = convert(pre_ln_model())
    applied(record)
    sites = {s["site"]: s for s in models.fused(record, TO_RMS)}
    assert {s["op"] for s in sites.values()} == {"RMSNormalization"} and len(sites) == 2
    shifts = sorted(s["shift"] for s in sites.values())
    assert shifts == ["folded into 1 linear readers", "kept as an Add (y is a graph output)"]


def test_layer_norm_on_a_graph_input_stays_a_layer_norm():
    model = pre_ln_model()
    model.graph.node.append(helper.make_node("LayerNormalization", ["u", "g2", "b2"], ["u_n"], axis=-1))
    model.graph.input.append(helper.make_tensor_value_info("u", TensorProto.FLOAT, XS))
    output(model, "u_n")
    out, record = convert(model)
    applied(record)
    [site] = models.unfused(record, TO_RMS)
    assert site["reason"] == "the stream takes graph input u directly"
    assert record["rule_counts"][TO_RMS] == 2 and models.ops(out)["LayerNormalization"] == 1


def test_layer_norm_to_rms_norm_keeps_the_shift_for_a_non_linear_reader():
    model = pre_ln_model()
    model.graph.node.append(helper.make_node("Relu", ["n1"], ["n1_relu"]))
    output(model, "n1_relu")
    _, record = convert(model)
    applied(record)
    shifts = {s["shift"] for s in models.fused(record, TO_RMS)}
    assert "kept as an Add (n1 is read by Relu, which is not a linear layer)" in shifts


# --- layer-norm (the decomposed ones, fused before the plan) ---------------------------------


def test_decomposed_layer_norm_is_fused_then_planned():
    _, record = convert(build(layer_norm_nodes()))
    assert record["rule_counts"] == {"layer-norm": 1}
    assert models.fused(record, "layer-norm")[0]["op"] == "LayerNormalization"
    assert models.unfused(record, TO_RMS)[0]["reason"] == "no LayerNorm reads a residual stream"
