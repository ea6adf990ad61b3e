"""fuse-norms, rule by rule: a match, a non-match with its reason, a shared intermediate."""

from __future__ import annotations

import numpy as np
from onnx import TensorProto, helper

from tests.norms import models
from tests.norms.test_fuse_norms import (
    CONSTS,
    D,
    X,
    Y,
    axes_as_attributes,
    build,
    fuse,
    layer_norm_nodes,
    onnx_opset,
    rms_nodes,
)

XS = ["batch", "seq", D]


def only(record: dict, rule: str) -> dict:
    [site] = [s for s in record["details"]["sites"] if s["rule"] == rule]
    return site


def applied(record: dict, counts: dict) -> None:
    assert record["status"] == "applied", record["reason"]
    assert {k: v for k, v in record["rule_counts"].items() if v} == counts
    assert record["max_diff"] <= 1e-5


# --- no-op-cast ------------------------------------------------------------------------------


def cast_model(extra_reader: bool = False, output: bool = False):
    nodes = [
        helper.make_node("Cast", ["x"], ["c"], to=TensorProto.FLOAT),
        helper.make_node("Relu", ["c"], ["y"]),
    ]
    outputs = [*Y, *([("c", XS)] if output else [])]
    if extra_reader:
        nodes.append(helper.make_node("Neg", ["c"], ["z"]))
        outputs.append(("z", XS))
    return build(nodes, outputs=outputs)


def test_no_op_cast_is_dropped():
    out, record = fuse(cast_model())
    applied(record, {"no-op-cast": 1})
    assert models.ops(out) == {"Relu": 1}
    assert only(record, "no-op-cast")["status"] == "fused"


def test_no_op_cast_that_is_a_graph_output_stays():
    out, record = fuse(cast_model(output=True))
    assert record["status"] == "unchanged" and "Cast" in models.ops(out)
    assert only(record, "no-op-cast")["reason"] == "its output is a graph output"


def test_no_op_cast_with_two_readers_rewires_both():
    out, record = fuse(cast_model(extra_reader=True))
    applied(record, {"no-op-cast": 1})
    assert models.ops(out) == {"Relu": 1, "Neg": 1}
    assert all(list(n.input) == ["x"] for n in out.graph.node)


# --- layer-norm ------------------------------------------------------------------------------


def test_layer_norm_rule_records_its_site():
    out, record = fuse(build(layer_norm_nodes()))
    applied(record, {"layer-norm": 1})
    site = only(record, "layer-norm")
    assert (site["status"], site["op"], site["form"]) == ("fused", "LayerNormalization", "affine")
    assert {p.key: p.value for p in out.graph.node[0].metadata_props}["txcompile.rule"] == "layer-norm"


def test_layer_norm_with_a_computed_epsilon_says_so():
    model = build(layer_norm_nodes(), inputs=[*X, ("e", [1])])
    next(n for n in model.graph.node if n.output[0] == "var_eps").input[1] = "e"
    out, record = fuse(model)
    assert "LayerNormalization" not in models.ops(out)
    site = only(record, "layer-norm")
    assert site["status"] == "unfused" and "adds a non-constant epsilon" in site["reason"]


def test_layer_norm_whose_centered_input_is_read_elsewhere_is_not_fused():
    extra = [helper.make_node("Relu", ["d"], ["r"])]
    out, record = fuse(build(layer_norm_nodes(extra=extra), outputs=[*Y, ("r", XS)]))
    assert "LayerNormalization" not in models.ops(out)
    assert only(record, "layer-norm")["reason"] == "intermediate d is also read by Relu"


# --- rms-norm --------------------------------------------------------------------------------


def test_rms_norm_rule_records_its_site():
    out, record = fuse(build(rms_nodes(gemma=True)))
    applied(record, {"rms-norm": 1})
    site = only(record, "rms-norm")
    assert (site["op"], site["form"]) == ("RMSNormalization", "gemma (1 + weight)")
    assert next(o.version for o in out.opset_import if o.domain == "") == 23


def test_rms_norm_at_opset_17_converts_the_graph_to_opset_23():
    nodes = axes_as_attributes(
        [helper.make_node("ReduceMean", ["x", "axes"], ["m"]), *rms_nodes(x="x", out="r")]
    )
    nodes.append(helper.make_node("Add", ["r", "m"], ["y"]))  # a ReduceMean the converter must rewrite too
    out, record = fuse(build(nodes, opset=17))
    assert record["rule_counts"] == {"rms-norm": 1}
    assert onnx_opset(out) == 23
    assert (
        record["details"]["opset"] == "converted the graph from ONNX opset 17 to 23 (onnx version converter)"
    )
    assert models.ops(out) == {
        "Constant": 1,
        "ReduceMean": 1,
        "RMSNormalization": 1,
        "Add": 1,
    }  # axes: a Constant
    reduce_mean = next(n for n in out.graph.node if n.op_type == "ReduceMean")
    assert len(reduce_mean.input) == 2 and not reduce_mean.attribute  # axes became an input
    assert record["max_diff"] <= 1e-5


def test_rms_norm_with_an_op_that_changed_meaning_on_the_way_stays_decomposed():
    """RoiAlign's default coordinate mode changed at opset 16: the graph stays at opset 14."""
    roi_align = helper.make_node(
        "RoiAlign", ["img", "rois", "index"], ["x"], output_height=1, output_width=D, mode="avg"
    )
    consts = {**CONSTS, "rois": np.array([[0.0, 0.0, 3.0, 3.0]]), "index": np.array([0])}
    nodes = [roi_align, *axes_as_attributes(rms_nodes())]
    model = models.graph_model(nodes, [("img", [1, 2, 4, D])], [("y", [1, 2, 1, D])], consts, 14)
    out, record = fuse(model)
    assert record["status"] == "unchanged" and onnx_opset(out) == 14
    reason = models.unfused(record, "rms-norm")[0]["reason"]
    assert reason == "needs opset 23: RoiAlign changed meaning after opset 14"


def test_rms_norm_read_by_a_residual_add_keeps_opset_17():
    """A Skip norm (com.microsoft) needs no newer ONNX opset, so the graph is not converted."""
    nodes = axes_as_attributes(rms_nodes(x="h", out="normed"))
    nodes = [
        helper.make_node("Add", ["x", "x2"], ["h"]),
        *nodes,
        helper.make_node("MatMul", ["normed", "w2"], ["y"]),
    ]
    consts = {**CONSTS, "w2": np.eye(D)}
    model = models.graph_model(nodes, [*X, ("x2", ["batch", "seq", D])], Y, consts, 17)
    out, record = fuse(model)
    assert record["rule_counts"] == {"rms-norm": 1, "skip-rms-norm": 1}
    assert onnx_opset(out) == 17 and "opset" not in record["details"]


def test_rms_norm_whose_square_is_read_elsewhere_is_not_fused():
    nodes = [*rms_nodes(), helper.make_node("Relu", ["sq"], ["r"])]
    out, record = fuse(build(nodes, outputs=[*Y, ("r", XS)]))
    assert "RMSNormalization" not in models.ops(out)
    assert only(record, "rms-norm")["reason"] == "intermediate sq is also read by Relu"


def test_rms_norm_whose_inverse_is_read_elsewhere_is_not_fused():
    nodes = [*rms_nodes(), helper.make_node("Relu", ["inv"], ["r"])]
    out, record = fuse(build(nodes, outputs=[*Y, ("r", ["batch", "seq", 1])]))
    assert "RMSNormalization" not in models.ops(out)
    assert only(record, "rms-norm")["reason"] == "inv does not multiply x"


# --- skip-layer-norm / skip-rms-norm ---------------------------------------------------------


def residual_model(op: str, first=("a", "x"), stream_reader=True, branch_bias=False):
    """h = Add(a, x) → norm op; the stream h goes on into another Add when ``stream_reader``."""
    nodes = []
    if branch_bias:  # a = m + bias, as a projection writes it
        nodes.append(helper.make_node("Add", ["m", "b"], ["a"]))
    nodes.append(helper.make_node("Add", list(first), ["h"]))
    inputs = ["h", "w", "b"] if op == "LayerNormalization" else ["h", "w"]
    nodes.append(helper.make_node(op, inputs, ["n"], axis=-1, epsilon=1e-5))
    outputs = [("n", XS)]
    if stream_reader:
        nodes.append(helper.make_node("Add", ["h", "n"], ["y"]))
        outputs = [*Y]
    source = "m" if branch_bias else "a"
    opset = 20 if op == "LayerNormalization" else 23
    return models.graph_model(nodes, [*X, (source, XS)], outputs, CONSTS, opset)


def test_skip_layer_norm_takes_the_residual_add():
    out, record = fuse(residual_model("LayerNormalization", stream_reader=False), device="cuda")
    applied(record, {"skip-layer-norm": 1})
    assert models.ops(out) == {"SkipLayerNormalization": 1}
    assert only(record, "skip-layer-norm")["op"] == "SkipLayerNormalization"


def test_skip_layer_norm_after_a_constant_add_says_why():
    out, record = fuse(residual_model("LayerNormalization", first=("x", "b"), stream_reader=False))
    assert "SkipLayerNormalization" not in models.ops(out)
    assert "adds a constant, not a residual branch" in only(record, "skip-layer-norm")["reason"]


def test_skip_layer_norm_on_the_cpu_says_why_it_keeps_the_pair():
    out, record = fuse(residual_model("LayerNormalization", stream_reader=False))
    assert record["status"] == "unchanged"
    assert models.ops(out) == {"Add": 1, "LayerNormalization": 1}
    assert "slower than the pair" in only(record, "skip-layer-norm")["reason"]


def test_skip_layer_norm_keeps_the_sum_for_its_other_reader():
    out, record = fuse(residual_model("LayerNormalization"), device="cuda")
    applied(record, {"skip-layer-norm": 1})
    skip = next(n for n in out.graph.node if n.op_type == "SkipLayerNormalization")
    add = next(n for n in out.graph.node if n.op_type == "Add")
    assert add.input[0] == skip.output[3]  # the stream reads the sum from the op's 4th output


def test_skip_rms_norm_takes_the_residual_add_and_the_branch_bias():
    out, record = fuse(residual_model("RMSNormalization", stream_reader=False, branch_bias=True))
    applied(record, {"skip-rms-norm": 1})
    assert models.ops(out) == {"SkipSimplifiedLayerNormalization": 1}
    assert only(record, "skip-rms-norm")["bias"] is True


def test_skip_rms_norm_on_a_graph_input_says_why():
    model = models.graph_model(
        [helper.make_node("RMSNormalization", ["x", "w"], ["y"], axis=-1)], X, Y, CONSTS, 23
    )
    out, record = fuse(model)
    assert record["status"] == "unchanged"
    assert only(record, "skip-rms-norm")["reason"] == "its input is not a residual Add"


def test_skip_rms_norm_leaves_a_branch_bias_with_another_reader():
    model = residual_model("RMSNormalization", branch_bias=True)
    model.graph.node.append(helper.make_node("Neg", ["a"], ["z"]))
    model.graph.output.append(helper.make_tensor_value_info("z", TensorProto.FLOAT, XS))
    out, record = fuse(model)
    applied(record, {"skip-rms-norm": 1})
    assert only(record, "skip-rms-norm")["bias"] is False  # the bias Add stays for Neg
    assert models.ops(out) == {"SkipSimplifiedLayerNormalization": 1, "Add": 2, "Neg": 1}
    assert np.isfinite(record["max_diff"])


# --- the report -------------------------------------------------------------------------------


def test_inspect_shows_unfused_norm_sites_with_their_reason(tmp_path, capsys):
    """Norm sites reach the shared coverage table, not only the JSON (any family's records do)."""
    import onnx

    from txcompile.cli import main

    extra = [helper.make_node("Relu", ["d"], ["r"])]
    source, out = tmp_path / "norm.onnx", tmp_path / "out.onnx"
    onnx.save(build(layer_norm_nodes(extra=extra), outputs=[*Y, ("r", XS)]), source)
    assert main(["optimize", str(source), "-o", str(out), "--passes", "fuse-norms"]) == 0
    capsys.readouterr()
    assert main(["inspect", str(out)]) == 0
    shown = capsys.readouterr().out
    assert "fusion coverage" in shown
    [row] = [line for line in shown.splitlines() if "layer-norm" in line and "fuse-norms" in line]
    assert "unfused" in row and "intermediate d is also read by Relu" in row
