"""The targets family's rule and its shared site records: a match, a non-match with its
reason, and an input another node also reads (DESIGN.md's three tests per rule)."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
from onnx import TensorProto, helper, numpy_helper

from txcompile.graph import ort as rt
from txcompile.passes.base import PassContext
from txcompile.passes.rules import apply_rule
from txcompile.passes.targets import (
    RULES,
    Int8MatMulRule,
    KernelCheck,
    PackSiblingMatMuls,
    Quantize,
    int8_matmul,
)
from txcompile.passes.targets.int8_rule import KEPT_FP32, Int8State, Tally
from txcompile.passes.targets.quantize import cosine

from .graphs import contrib, linear_block, make, tensor, weight

FEEDS = {"x": np.random.default_rng(0).standard_normal((8, 16)).astype(np.float32)}


def _quantize(model, feeds=FEEDS, **options):
    tx_pass = Quantize(PassContext("cpu", "cpu", feeds, {"precision": "int8", **options}))
    working = ir.serde.deserialize_model(model)
    tx_pass(working)
    return tx_pass, ir.serde.serialize_model(working)


def _ops(model) -> list[str]:
    return [n.op_type for n in model.graph.node]


def test_the_family_lists_its_rules():
    assert RULES == {"pack-matmuls": PackSiblingMatMuls, "int8-matmul": Int8MatMulRule}


def test_int8_matmul_rewrites_each_product_and_records_it():
    tx_pass, out = _quantize(linear_block(), int8_activations="token")
    sites = tx_pass.details["sites"]
    assert [(s["site"], s["rule"], s["status"], s["op"]) for s in sites] == [
        ("mm1", "int8-matmul", "fused", "MatMulInteger"),
        ("mm2", "int8-matmul", "fused", "MatMulInteger"),
    ]
    assert sites[0]["activations"] == "per token" and sites[0]["reason"] is None
    tags = {p.value for n in out.graph.node for p in n.metadata_props if p.key == "txcompile.rule"}
    assert tags == {"int8-matmul"}
    want = rt.run(rt.create_session(linear_block()), FEEDS)
    assert cosine(want, rt.run(rt.create_session(out), FEEDS)) > 0.93


def test_int8_matmul_keeps_what_min_cosine_excludes_with_the_reason():
    tx_pass, out = _quantize(linear_block(), min_cosine=0.999999)
    kept = [s for s in tx_pass.details["sites"] if s["status"] == "unfused"]
    assert kept and [s["site"] for s in kept] == sorted(tx_pass.details["kept_fp32"])
    assert {s["reason"] for s in kept} == {KEPT_FP32} and "MatMul" in _ops(out)


def test_int8_matmul_says_why_a_float16_weight_stays():
    nodes = [helper.make_node("MatMul", ["x", "w"], ["y"], name="half")]
    w = numpy_helper.from_array(np.ones((4, 4), np.float16), "w")
    model = ir.serde.deserialize_model(
        make(
            nodes,
            [tensor("x", ["m", 4], TensorProto.FLOAT16)],
            [tensor("y", ["m", 4], TensorProto.FLOAT16)],
            [w],
        )
    )
    state = Int8State(schemes={}, bits=8, opset=18, candidates=set())
    (record,) = apply_rule(Tally(), Int8MatMulRule(), model, state)
    assert record.status == "unfused" and record.reason == "float16 weight: only float32 is quantized"
    assert [n.op_type for n in model.graph] == ["MatMul"]


def test_int8_matmul_quantizes_a_shared_input_once_and_leaves_its_other_reader():
    """x feeds two MatMuls and an Add: one QuantizeLinear serves both products, the Add still
    reads the fp32 x."""
    nodes = [
        helper.make_node("MatMul", ["x", "wa"], ["a"], name="mm_a"),
        helper.make_node("MatMul", ["x", "wb"], ["b"], name="mm_b"),
        helper.make_node("Add", ["a", "b"], ["ab"], name="ab"),
        helper.make_node("Add", ["ab", "x"], ["y"], name="residual"),
    ]
    model = make(
        nodes,
        [tensor("x", ["m", 16])],
        [tensor("y", ["m", 16])],
        [weight("wa", (16, 16), 1), weight("wb", (16, 16), 2)],
    )
    tx_pass, out = _quantize(model, int8_activations="token")
    assert [s["status"] for s in tx_pass.details["sites"]] == ["fused", "fused"]
    assert _ops(out).count("QuantizeLinear") == 1 and _ops(out).count("MatMulInteger") == 2
    residual = next(n for n in out.graph.node if n.name == "residual")
    assert list(residual.input)[1] == "x"
    want, got = rt.run(rt.create_session(model), FEEDS), rt.run(rt.create_session(out), FEEDS)
    assert cosine(want, got) > 0.99


def test_int8_product_matches_its_simulation():
    """The rule's graph computes what int8_matmul.simulate says (per token, no smoothing)."""
    tx_pass, out = _quantize(linear_block(), feeds={}, int8_activations="token")
    w1 = next(numpy_helper.to_array(t) for t in linear_block().graph.initializer if t.name == "w1")
    probe = ir.serde.deserialize_model(out)
    h = next(n for n in probe.graph if n.outputs[0].name == "h").outputs[0]
    probe.graph.outputs[:] = [h]
    got = rt.run(rt.create_session(ir.serde.serialize_model(probe)), FEEDS)["h"]
    want = int8_matmul.simulate(FEEDS["x"], w1, bits=tx_pass.details["weight_bits"])
    np.testing.assert_allclose(got, want, atol=1e-4)


def test_kernel_check_sites_use_the_shared_record():
    tx_pass = KernelCheck(PassContext("cpu", "cpu"))
    tx_pass(ir.serde.deserialize_model(contrib("BiasSoftmax", ["scores", "bias"], is_inner_broadcast=0)))
    (site,) = tx_pass.details["sites"]
    assert site == {
        "site": "biassoftmax",
        "rule": "no-kernel",
        "status": "unfused",
        "op": "com.microsoft.BiasSoftmax",
        "reason": "CPU has no BiasSoftmax kernel",
        "opset": 1,
        "types": site["types"],
    }
