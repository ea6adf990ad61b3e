"""pack-matmuls: sibling products over one input become one MatMul and a Split, exactly."""

from __future__ import annotations

import numpy as np
from onnx import TensorProto, helper, numpy_helper

from txcompile.passes.targets.pack_matmuls import PackMatMuls

from ..attention.graphs import checked_model, max_diff, op_types, run_pass

HIDDEN = 8


def siblings(widths=(8, 4, 4), computed: int | None = None, output_product: int | None = None):
    """x [B, S, 8] → Relu → MatMul by each weight [8, width_i] (weight ``computed`` made at run
    time, by a Relu) → the sum of the products' sums."""
    rng = np.random.default_rng(0)
    inits, nodes, outputs = [], [helper.make_node("Relu", ["x"], ["h"])], []
    for i, n in enumerate(widths):
        inits.append(numpy_helper.from_array(rng.standard_normal((HIDDEN, n)).astype(np.float32), f"w{i}"))
        weight = f"w{i}"
        if i == computed:
            nodes.append(helper.make_node("Relu", [weight], [f"r{i}"]))
            weight = f"r{i}"
        nodes.append(helper.make_node("MatMul", ["h", weight], [f"y{i}"]))
        nodes.append(helper.make_node("ReduceSum", [f"y{i}"], [f"s{i}"], keepdims=0))
        outputs.append(f"s{i}")
    nodes.append(helper.make_node("Sum", outputs, ["out"]))
    graph_outputs = [helper.make_tensor_value_info("out", TensorProto.FLOAT, [])]
    if output_product is not None:
        shape = ["b", "s", widths[output_product]]
        graph_outputs.append(helper.make_tensor_value_info(f"y{output_product}", TensorProto.FLOAT, shape))
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", "s", HIDDEN])]
    return checked_model(helper.make_graph(nodes, "siblings", inputs, graph_outputs, inits))


def _feeds():
    return {"x": np.random.default_rng(1).standard_normal((2, 3, HIDDEN)).astype(np.float32)}


def _packed(model, precision="int8"):
    """The pass where it packs (int8 quantizes the packed weight as one)."""
    return run_pass(PackMatMuls, model, {"precision": precision}, context_feeds=_feeds())


def test_fp32_on_the_cpu_packs_only_a_graph_with_a_kv_cache():
    model = siblings()
    tx_pass, kept = _packed(model, precision=None)
    (site,) = tx_pass.details["sites"]
    assert site["status"] != "fused" and site["reason"] == (
        "fp32 on the CPU without a KV cache: the products run as fast apart, without a Split"
    )
    assert op_types(kept) == op_types(model)
    past = helper.make_tensor_value_info("past_key_values.0.key", TensorProto.FLOAT, ["b", 2, "p", 4])
    model.graph.input.append(past)
    tx_pass, packed = _packed(model, precision=None)
    assert op_types(packed).count("MatMul") == 1 and tx_pass.details["sites"][0]["status"] == "fused"


def test_three_siblings_become_one_product():
    model = siblings()
    tx_pass, packed = _packed(model)
    assert op_types(packed).count("MatMul") == 1 and op_types(packed).count("Split") == 1
    (site,) = tx_pass.details["sites"]
    assert (site["rule"], site["status"], site["products"]) == ("pack-matmuls", "fused", 3)
    assert max_diff(model, packed, _feeds()) < 1e-5


def test_a_weight_made_at_run_time_stays_out():
    model = siblings(widths=(8, 4), computed=1)
    tx_pass, packed = _packed(model)
    (site,) = tx_pass.details["sites"]
    assert site["reason"] == "fewer than two of its MatMuls have a constant 2-D float32 weight"
    assert op_types(packed) == op_types(model)
    tx_pass, packed = _packed(siblings(computed=1))
    assert op_types(packed).count("MatMul") == 2 and tx_pass.details["sites"][0]["products"] == 2


def test_a_product_that_is_a_graph_output_stays_and_the_rest_pack():
    model = siblings(output_product=0)
    tx_pass, packed = _packed(model)
    assert op_types(packed).count("MatMul") == 2  # y0 kept as it was, y1 and y2 packed
    assert [o.name for o in packed.graph.output] == ["out", "y0"]
    assert max_diff(model, packed, _feeds()) < 1e-5
    lone = siblings(widths=(8, 4), output_product=0)
    tx_pass, _ = _packed(lone)
    assert tx_pass.details["sites"][0]["reason"] == (
        "fewer than two of its MatMuls have a constant 2-D float32 weight"
    )
