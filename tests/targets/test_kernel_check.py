"""kernel-check: an op without a kernel on the target is caught, explained and shown."""

from __future__ import annotations

import onnx_ir as ir
import pytest
from onnx import TensorProto

from txcompile import render
from txcompile.passes.base import PassContext
from txcompile.passes.targets.kernel_check import KernelCheck, value_dtypes

from .graphs import contrib, linear_block


def check(model, device: str) -> KernelCheck:
    tx_pass = KernelCheck(PassContext("gpu" if device == "cuda" else "cpu", device))
    result = tx_pass(ir.serde.deserialize_model(model))
    assert not result.modified
    return tx_pass


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_plain_graph_has_every_kernel(device):
    found = check(linear_block(), device)
    assert found.details["missing"] == 0 and found.details["checked"] == 5
    assert not found.rule_counts


def test_no_cpu_kernel_is_caught():
    found = check(contrib("BiasSoftmax", ["scores", "bias"], is_inner_broadcast=0), "cpu")
    assert found.rule_counts["no-kernel"] == 1
    site = found.details["sites"][0]
    assert site["op"] == "com.microsoft.BiasSoftmax" and site["reason"] == "CPU has no BiasSoftmax kernel"
    assert "fail to load" in found.details["consequence"]


def test_wrong_dtype_on_cuda_is_caught_with_what_exists():
    found = check(
        contrib("GroupQueryAttention", ["query", "key", "value"], num_heads=2, kv_num_heads=2), "cuda"
    )
    site = found.details["sites"][0]
    assert site["types"] == {"T": "float"}
    assert site["reason"] == "CUDA has no GroupQueryAttention kernel for T=float (has T: bfloat16 float16)"
    assert "fall back to the CPU" in found.details["consequence"]


def test_same_op_at_a_supported_dtype_passes():
    model = contrib(
        "GroupQueryAttention", ["query", "key", "value"], TensorProto.FLOAT16, num_heads=2, kv_num_heads=2
    )
    assert check(model, "cuda").details["missing"] == 0


def test_untyped_outputs_get_their_dtype_from_the_schema():
    model = ir.serde.deserialize_model(contrib("FastGelu", ["x"], TensorProto.FLOAT16))
    produced = model.graph.node(0).outputs[0]
    assert produced.dtype is None and value_dtypes(model)[produced] == "float16"


def test_report_shows_the_fallback(tmp_path):
    found = check(contrib("BiasSoftmax", ["scores", "bias"], is_inner_broadcast=0), "cpu")
    report = {"passes": [{"name": "kernel-check", "details": found.details}]}
    lines = render.kernel_lines(report)
    assert lines[0].startswith("kernel check (CPUExecutionProvider): 1 of 1 ops have no kernel")
    assert "1× CPU has no BiasSoftmax kernel" in lines[1]
    clean = {"passes": [{"name": "kernel-check", "details": check(linear_block(), "cpu").details}]}
    assert render.kernel_lines(clean) == [
        "kernel check (CPUExecutionProvider): all 5 ops have a kernel at their dtype"
    ]


def test_inspect_prints_the_kernel_check(tmp_path, mlp_file, capsys):
    from txcompile.cli import main

    out = tmp_path / "out.onnx"
    assert main(["optimize", mlp_file, "-o", str(out), "--no-verify"]) == 0
    capsys.readouterr()
    assert main(["inspect", str(out)]) == 0
    assert "kernel check (CPUExecutionProvider): all" in capsys.readouterr().out
