"""precision: fp16/bf16 where the target has kernels; fp32 where numerics or kernels need it."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx.reference import ReferenceEvaluator

from txcompile import pipelines
from txcompile.graph import kernels
from txcompile.graph import ort as rt
from txcompile.graph.errors import TxError
from txcompile.passes.base import PassContext
from txcompile.passes.targets.kernel_check import missing_kernels
from txcompile.passes.targets.precision import Precision

from .graphs import linear_block, rms_norm, shared_intermediate


def convert(model, device="cuda", **options):
    target = "gpu" if device == "cuda" else "cpu"
    tx_pass = Precision(PassContext(target, device, {}, options))
    working = ir.serde.deserialize_model(model)
    tx_pass(working)
    out = ir.serde.serialize_model(working)
    onnx.checker.check_model(out)
    return tx_pass, working, out


def ops_by_dtype(model: ir.Model) -> dict[str, str]:
    return {n.name: n.outputs[0].dtype.name for n in model.graph if n.outputs[0].dtype is not None}


def reference(model, feeds):
    """Run with ONNX's reference evaluator: it has fp16 kernels where the CPU EP has none."""
    return ReferenceEvaluator(model).run(None, feeds)


FEEDS = {"x": np.random.default_rng(0).standard_normal((3, 16)).astype(np.float32)}


def test_fp16_for_cuda_lowers_the_whole_block():
    tx_pass, working, out = convert(linear_block())
    dtypes = ops_by_dtype(working)
    assert all(dtypes[n] == "FLOAT16" for n in ("mm1", "bias", "relu", "mm2", "ln"))
    assert tx_pass.rule_counts["to-float16"] == 5 and tx_pass.rule_counts["cast"] == 2  # in and out
    assert [i.type.tensor_type.elem_type for i in [*out.graph.input, *out.graph.output]] == [1, 1]
    assert {t.name: t.data_type for t in out.graph.initializer}["w1_float16"] == onnx.TensorProto.FLOAT16
    assert missing_kernels(working, kernels.cuda_table())[1] == []
    expected = rt.run(rt.create_session(linear_block()), FEEDS)["y"]
    assert np.abs(reference(out, FEEDS)[0] - expected).max() < 2e-2


def test_numerically_sensitive_chain_stays_fp32():
    tx_pass, working, out = convert(rms_norm())
    dtypes = ops_by_dtype(working)
    assert dtypes["mm"] == "FLOAT16" and dtypes["scale"] == "FLOAT16" and dtypes["gain_mul"] == "FLOAT16"
    for kept in ("pow", "mean", "add_eps", "sqrt", "rsqrt"):
        assert dtypes[kept] == "FLOAT", kept
    assert tx_pass.details["kept_fp32"]["Add"] == {"fed only by fp32 work": 1}
    assert "x² overflows fp16 and variance needs fp32" in tx_pass.details["kept_fp32"]["Pow"]
    expected = rt.run(rt.create_session(rms_norm()), FEEDS)["y"]
    assert np.abs(reference(out, FEEDS)[0] - expected).max() < 2e-2


def test_shared_intermediate_is_cast_once_and_outputs_keep_names():
    tx_pass, working, out = convert(shared_intermediate())
    dtypes = ops_by_dtype(working)
    assert dtypes["mm"] == "FLOAT16" and dtypes["relu"] == "FLOAT16" and dtypes["exp"] == "FLOAT"
    casts_of_h = [n for n in out.graph.node if n.op_type == "Cast" and n.input[0] == "h_float16"]
    assert len(casts_of_h) == 1  # one Cast serves Exp and the graph output "h"
    assert [o.name for o in out.graph.output] == ["y", "h"]
    expected = rt.run(rt.create_session(shared_intermediate()), FEEDS)
    got = reference(out, FEEDS)
    assert max(np.abs(g - e).max() for g, e in zip(got, expected.values(), strict=True)) < 2e-2


def test_cpu_kernels_decide_and_the_graph_runs_on_the_cpu_ep():
    tx_pass, working, out = convert(linear_block(), device="cpu", precision="fp16")
    kept = tx_pass.details["kept_fp32"]
    assert "no float16 kernel on CPU" in kept["MatMul"]
    assert missing_kernels(working, kernels.cpu_table())[1] == []
    got = rt.run(rt.create_session(out), FEEDS)["y"]
    assert np.abs(got - rt.run(rt.create_session(linear_block()), FEEDS)["y"]).max() < 1e-2


def test_bf16_and_low_precision_io():
    tx_pass, working, out = convert(linear_block(), precision="bf16", low_precision_io=True)
    assert out.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.BFLOAT16
    assert out.graph.output[0].type.tensor_type.elem_type == onnx.TensorProto.BFLOAT16
    assert tx_pass.rule_counts.get("cast", 0) == 0
    assert missing_kernels(working, kernels.cuda_table())[1] == []


def test_fp32_and_cpu_default_change_nothing():
    for device, options in (("cpu", {}), ("cuda", {"precision": "fp32"})):
        tx_pass = Precision(PassContext("cpu" if device == "cpu" else "gpu", device, {}, options))
        assert not tx_pass(ir.serde.deserialize_model(linear_block())).modified


@pytest.mark.parametrize("options,message", [({"precision": "int8"}, "int8 is for --target cpu")])
def test_bad_combination_is_refused_when_the_pipeline_is_built(options, message):
    context = PassContext("gpu", "cuda", {}, options)
    with pytest.raises(TxError, match=message):
        pipelines.build(pipelines.pass_names("gpu"), context)


def test_tiny_bert_fp16_for_cuda(tiny_bert, tiny_bert_feeds):
    tx_pass, working, out = convert(tiny_bert)
    assert tx_pass.details["low_ops"]["MatMul"] == 16
    assert missing_kernels(working, kernels.cuda_table())[1] == []
    expected = rt.run(rt.create_session(tiny_bert), tiny_bert_feeds)
    names = [i.name for i in out.graph.input]
    got = reference(out, {k: v for k, v in tiny_bert_feeds.items() if k in names})
    assert np.abs(got[0] - list(expected.values())[0]).max() < 2e-2
    on_cpu = convert(tiny_bert, device="cpu", precision="fp16")[2]
    cpu_out = rt.run(rt.create_session(on_cpu), tiny_bert_feeds)
    assert rt.max_abs_diff(cpu_out, expected) < 1e-2
