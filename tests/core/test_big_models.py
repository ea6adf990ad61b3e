"""Models over protobuf's 2 GiB: loaded, optimized, verified, saved and run for real, not with a
lowered threshold. The weights are one zero-filled embedding table, cheap to build."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest

from tests.conftest import mlp_model
from txcompile import cli
from txcompile.graph import size


def _big_model(path, rows: int = 33_000, width: int = 16_384) -> None:
    """Gather from a rows x width fp32 table (2.16 GB), then a small MatMul; saved by onnx_ir."""
    ids = ir.Value(name="input_ids", type=ir.TensorType(ir.DataType.INT64), shape=ir.Shape(["batch", "seq"]))
    table = ir.Value(
        name="embeddings", const_value=ir.tensor(np.zeros((rows, width), np.float32), name="embeddings")
    )
    weight = ir.Value(
        name="w",
        const_value=ir.tensor(np.random.default_rng(0).standard_normal((width, 8), np.float32), name="w"),
    )
    for value in (table, weight):
        value.shape, value.type = value.const_value.shape, ir.TensorType(ir.DataType.FLOAT)
    gather = ir.node("Gather", [table, ids])
    matmul = ir.node("MatMul", [gather.outputs[0], weight])
    output = matmul.outputs[0]
    output.name, output.type, output.shape = (
        "y",
        ir.TensorType(ir.DataType.FLOAT),
        ir.Shape(["batch", "seq", 8]),
    )
    graph = ir.Graph(
        [ids],
        [output],
        nodes=[gather, matmul],
        initializers=[table, weight],
        opset_imports={"": 17},
        name="big",
    )
    ir.save(ir.Model(graph, ir_version=9), path, external_data=path.name + ".data")


def test_the_size_estimate_is_never_below_protobufs():
    model = mlp_model()
    assert size.estimated_bytes(model) >= model.ByteSize()


@pytest.mark.slow
def test_a_model_over_2_gib_optimizes_and_runs(tmp_path, capsys):
    source, out = tmp_path / "big.onnx", tmp_path / "out.onnx"
    _big_model(source)
    assert (tmp_path / "big.onnx.data").stat().st_size > 2**31
    assert cli.main(["optimize", str(source), "-o", str(out), "--disable-pass", "sparse-matmul"]) == 0, (
        capsys.readouterr().err
    )
    assert "verification passed" in capsys.readouterr().out
    assert (tmp_path / "out.onnx.data").stat().st_size > 2**31 and out.stat().st_size < 2**20
    onnx.checker.check_model(str(out))
    assert cli.main(["run", str(out), "--compare", str(source)]) == 0, capsys.readouterr().err
    assert "max diff vs" in capsys.readouterr().out
