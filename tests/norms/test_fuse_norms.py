"""fuse-norms: decomposed LayerNorm / RMSNorm → one op, residual Add + norm → Skip norm."""

from __future__ import annotations

import numpy as np
import pytest
from onnx import helper, numpy_helper

from tests.norms import models

D = 8
RNG = np.random.default_rng(0)
WEIGHT, BIAS = 1 + 0.1 * RNG.standard_normal(D), 0.1 * RNG.standard_normal(D)
X = [("x", ["batch", "seq", D])]
DECOMPOSED = ("layer-norm", "rms-norm")  # the decomposed-norm rules (once details["left"])
SKIP = ("skip-layer-norm", "skip-rms-norm")  # the Skip rules (once details["no_skip"])
Y = [("y", ["batch", "seq", D])]


def layer_norm_nodes(x="x", out="y", reciprocal=False, extra=()):
    """TorchScript's LayerNorm below opset 17 (Div form) or the Reciprocal form."""
    tail = (
        [helper.make_node("Reciprocal", ["std"], ["inv"]), helper.make_node("Mul", ["d", "inv"], ["n"])]
        if reciprocal
        else [helper.make_node("Div", ["d", "std"], ["n"])]
    )
    return [
        helper.make_node("ReduceMean", [x, "axes"], ["mean"]),
        helper.make_node("Sub", [x, "mean"], ["d"]),
        helper.make_node("Pow", ["d", "two"], ["sq"]),
        helper.make_node("ReduceMean", ["sq", "axes"], ["var"]),
        helper.make_node("Add", ["var", "eps"], ["var_eps"]),
        helper.make_node("Sqrt", ["var_eps"], ["std"]),
        *tail,
        helper.make_node("Mul", ["n", "w"], ["scaled"]),
        helper.make_node("Add", ["scaled", "b"], [out]),
        *extra,
    ]


def rms_nodes(x="x", out="y", gemma=False):
    """LLaMA (dynamo: Reciprocal) and Gemma (``* (1 + w)``) RMSNorm."""
    weight = ["one", "w"] if gemma else None
    nodes = [
        helper.make_node("Pow", [x, "two"], ["sq"]),
        helper.make_node("ReduceMean", ["sq", "axes"], ["ms"]),
        helper.make_node("Add", ["ms", "eps"], ["ms_eps"]),
        helper.make_node("Sqrt", ["ms_eps"], ["rms"]),
        helper.make_node("Reciprocal", ["rms"], ["inv"]),
        helper.make_node("Mul", [x, "inv"], ["n"]),
    ]
    if weight:
        nodes.append(helper.make_node("Add", weight, ["w1"]))
        nodes.append(helper.make_node("Mul", ["n", "w1"], [out]))
    else:
        nodes.append(helper.make_node("Mul", ["w", "n"], [out]))
    return nodes


CONSTS = {"axes": np.array([-1]), "two": 2.0, "eps": 1e-5, "w": WEIGHT, "b": BIAS, "one": 1.0}


def build(nodes, inputs=X, outputs=Y, opset=20):
    return models.graph_model(nodes, inputs, outputs, CONSTS, opset)


def fuse(model, cleanup=False, device="cpu"):
    """fuse-norms as compile runs it for ``device``; on cuda (no GPU here) the pass runs without
    the pass manager's check, and the result is compared with the model on the CPU (the Skip
    ops have CPU kernels too)."""
    if device == "cpu":
        out, records = models.optimize(model, ["fuse-norms"], cleanup=cleanup)
        return out, records["fuse-norms"]
    import dataclasses

    from txcompile import pipelines
    from txcompile.graph import ort as rt
    from txcompile.pass_manager import PassManager
    from txcompile.passes.base import PassContext

    feeds = models.feeds(model)
    context = PassContext("gpu", device, feeds, {})
    names = (models.CLEANUP if cleanup else []) + ["fuse-norms"]
    manager = PassManager(pipelines.build(names, context), device=device, verify=False)
    result = manager.run(model, feeds)
    record = dataclasses.asdict(result.records[-1])
    out = result.model
    record["max_diff"] = rt.max_abs_diff(
        rt.run(rt.create_session(model), feeds), rt.run(rt.create_session(out), feeds)
    )
    return out, record


def axes_as_attributes(nodes):
    """ReduceMean as opsets below 18 write it: axes an attribute, not an input."""
    for node in nodes:
        if node.op_type == "ReduceMean":
            del node.input[1]
            node.attribute.append(helper.make_attribute("axes", [-1]))
    return nodes


def onnx_opset(model) -> int:
    return next(o.version for o in model.opset_import if o.domain == "")


@pytest.mark.parametrize("reciprocal", [False, True])
def test_layer_norm_fuses(reciprocal):
    out, record = fuse(build(layer_norm_nodes(reciprocal=reciprocal)))
    assert record["status"] == "applied" and record["rule_counts"] == {"layer-norm": 1}
    assert models.ops(out) == {"LayerNormalization": 1}
    assert record["max_diff"] <= 1e-5


def test_layer_norm_at_opset_14_raises_opset_17():
    out, record = fuse(build(axes_as_attributes(layer_norm_nodes()), opset=14))
    assert record["status"] == "applied"
    assert onnx_opset(out) == 17 and record["details"]["opset"] == "raised the ONNX opset from 14 to 17"


@pytest.mark.parametrize("gemma", [False, True])
def test_rms_norm_fuses(gemma):
    out, record = fuse(build(rms_nodes(gemma=gemma)))
    assert record["status"] == "applied" and record["rule_counts"] == {"rms-norm": 1}
    assert models.ops(out) == {"RMSNormalization": 1}
    assert models.fused(record, "rms-norm")[0]["form"] == ("gemma (1 + weight)" if gemma else "affine")
    assert record["max_diff"] <= 1e-5


def test_mean_over_other_axis_is_not_a_norm():
    square = [("x", ["batch", D, D])]
    model = build(layer_norm_nodes(), inputs=square, outputs=[("y", ["batch", D, D])])
    names = [i.name for i in model.graph.initializer]
    model.graph.initializer[names.index("axes")].CopyFrom(numpy_helper.from_array(np.array([1]), "axes"))
    out, record = fuse(model)
    assert record["status"] == "unchanged" and "LayerNormalization" not in models.ops(out)


def test_non_constant_epsilon_is_left_with_reason():
    model = build(rms_nodes(), inputs=[*X, ("e", [1])])
    model.graph.node[2].input[1] = "e"
    out, record = fuse(model)
    assert "RMSNormalization" not in models.ops(out)
    assert "non-constant epsilon" in models.unfused(record, *DECOMPOSED)[0]["reason"]


def test_intermediate_with_another_reader_is_not_fused():
    extra = [helper.make_node("Relu", ["d"], ["r"])]
    model = build(layer_norm_nodes(extra=extra), outputs=[*Y, ("r", ["batch", "seq", D])])
    out, record = fuse(model)
    assert "LayerNormalization" not in models.ops(out)
    reason = models.unfused(record, *DECOMPOSED)[0]["reason"]
    assert "also read by Relu" in reason or "graph output" in str(record)


def test_residual_add_becomes_skip_layer_norm_and_keeps_the_sum():
    nodes = [helper.make_node("Add", ["a", "x"], ["h"]), *layer_norm_nodes(x="h", out="n_out")]
    nodes.append(helper.make_node("Add", ["h", "n_out"], ["y"]))  # the stream goes on
    model = build(nodes, inputs=[*X, ("a", ["batch", "seq", D])])
    out, record = fuse(model, device="cuda")
    assert record["rule_counts"] == {"layer-norm": 1, "skip-layer-norm": 1}
    assert models.ops(out) == {"SkipLayerNormalization": 1, "Add": 1}
    assert record["max_diff"] <= 1e-5
    # on the CPU the pair is the faster form: fused to LayerNormalization, the Add kept
    out, record = fuse(model)
    assert record["rule_counts"] == {"layer-norm": 1}
    assert models.ops(out) == {"LayerNormalization": 1, "Add": 2}
    assert "SkipLayerNormalization kernel is" in models.unfused(record, "skip-layer-norm")[0]["reason"]


def test_constant_add_is_not_a_residual():
    nodes = [helper.make_node("Add", ["x", "b"], ["h"]), *rms_nodes(x="h")]
    out, record = fuse(build(nodes))
    assert models.ops(out) == {"Add": 1, "RMSNormalization": 1}
    assert "adds a constant" in models.unfused(record, *SKIP)[0]["reason"]


FAMILIES = [
    ("llama", "torchscript", None, {"rms-norm": 5, "skip-rms-norm": 4}),
    ("t5-encoder", "torchscript", None, {"rms-norm": 5, "skip-rms-norm": 4}),
    ("bert", "torchscript", 14, {"layer-norm": 5}),
    ("vit", "torchscript", None, {"skip-layer-norm": 4}),
    ("llama", "torchscript", 17, {"rms-norm": 5, "skip-rms-norm": 4}),
]
SLOW_FAMILIES = [
    ("llama", "dynamo", None, {"rms-norm": 5, "skip-rms-norm": 4}),
    ("gpt2", "dynamo", None, {"skip-layer-norm": 5}),
    ("gpt2", "torchscript", 14, {"layer-norm": 5}),
    ("bert", "dynamo", None, {"skip-layer-norm": 4}),
    ("vit", "dynamo", None, {"skip-layer-norm": 4}),
]


def check_family(family, exporter, opset, expected):
    """On cuda where Skip LayerNorms are expected (the CPU keeps them as Add + LayerNormalization)."""
    model = models.exported(family, exporter, opset)
    out, record = fuse(model, cleanup=True, device="cuda" if "skip-layer-norm" in expected else "cpu")
    assert record["status"] == "applied", record["reason"]
    counts = {k: v for k, v in record["rule_counts"].items() if k != "no-op-cast"}
    for rule, n in expected.items():
        assert counts.get(rule, 0) >= n, (rule, counts)
    assert record["max_diff"] <= 1e-4
    assert models.unfused(record, *DECOMPOSED) == []
    left = models.ops(out)
    assert "Sqrt" not in left and "ReduceMean" not in left or family == "vit"
    if opset == 17 and "rms-norm" in expected:  # a lone RMSNorm needs opset 23: the graph was converted
        assert onnx_opset(out) == 23, record["details"].get("opset")


@pytest.mark.parametrize(("family", "exporter", "opset", "expected"), FAMILIES)
def test_family_norms_all_fused(family, exporter, opset, expected):
    check_family(family, exporter, opset, expected)


def test_cpu_keeps_residual_layer_norms_as_add_and_layer_normalization(monkeypatch, tmp_path):
    """ViT's four residual LayerNorms: each listed with the reason, and onnxruntime's CPU session
    (as txcompile creates it) does not fuse the pairs back into SkipLayerNormalization."""
    import onnx

    from txcompile.graph import ort as rt

    out, record = fuse(models.exported("vit", "torchscript", None), cleanup=True)
    kept = models.unfused(record, "skip-layer-norm")
    assert sum("slower than the pair" in s["reason"] for s in kept) == 4
    assert "SkipLayerNormalization" not in models.ops(out)
    optimized = tmp_path / "optimized.onnx"
    options = rt.session_options

    def saving(*args, **kwargs):
        chosen = options(*args, **kwargs)
        chosen.optimized_model_filepath = str(optimized)
        return chosen

    monkeypatch.setattr(rt, "session_options", saving)
    rt.create_session(out)
    ops = {n.op_type for n in onnx.load(optimized).graph.node}
    assert "LayerNormalization" in ops and "SkipLayerNormalization" not in ops


@pytest.mark.slow
@pytest.mark.parametrize(("family", "exporter", "opset", "expected"), SLOW_FAMILIES)
def test_family_norms_all_fused_slow(family, exporter, opset, expected):
    check_family(family, exporter, opset, expected)
