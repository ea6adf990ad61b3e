"""A quick measurement of one layer, dense against a sparse form, in the same ORT build and run.

Layers of the same shape and packing are measured once (BERT has dozens of identical ones).
Runs alternate in blocks and the ratio of medians is kept, so load on the machine hits both sides.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from txcompile.graph import ort as rt
from txcompile.graph.build import GraphBuilder
from txcompile.graph.nodes import MS_DOMAIN
from txcompile.runtime import bench

from . import column_groups

RUNS = 15  # per side, in blocks of 3


def layer_model(build, k: int, tokens: int) -> bytes:
    """A one-layer model: x [tokens, K] -> build(builder, x) -> y."""
    x = ir.val("x", dtype=ir.DataType.FLOAT, shape=ir.Shape([tokens, k]))
    graph = ir.Graph([x], [], nodes=[], opset_imports={"": 18, MS_DOMAIN: 1}, name="layer")
    builder = GraphBuilder(graph, "layer")
    y = build(builder, x)
    builder.commit()
    y.name = "y"
    graph.outputs.append(y)
    return ir.serde.serialize_model(ir.Model(graph, ir_version=9)).SerializeToString()


def dense_builder(weight: np.ndarray):
    def build(builder: GraphBuilder, x):
        return builder.op("MatMul", x, builder.const(weight))

    return build


def groups_builder(groups: column_groups.ColumnGroups, int8: bool):
    def build(builder: GraphBuilder, x):
        return column_groups.emit(builder, x, groups, rank=2, int8=int8)[0]

    return build


def speedup(
    dense_model: bytes, sparse_model: bytes, k: int, tokens: int, threads: int | None, device: str = "cpu"
) -> float:
    """Median time of dense / median time of sparse, from alternating blocks of runs."""
    feeds = {"x": np.random.default_rng(0).standard_normal((tokens, k)).astype(np.float32)}
    sessions = [rt.create_session(_proto(m), device, threads=threads) for m in (dense_model, sparse_model)]
    dense, sparse = bench.medians(sessions, feeds, iters=RUNS, per_block=3, warmup=2)
    return dense / max(sparse, 1e-12)


def _proto(data: bytes):
    import onnx

    return onnx.load_from_string(data)


_MEASURED: dict[tuple, float] = {}


def measure_groups(
    weight: np.ndarray,
    groups: column_groups.ColumnGroups,
    tokens: int,
    int8: bool,
    threads: int | None,
    device: str = "cpu",
) -> float:
    """Speedup of the column-group form over the dense MatMul for this layer's shape and packing."""
    key = (weight.shape, groups.cols, groups.width, tokens, int8, threads, device)
    if key not in _MEASURED:
        k = weight.shape[0]
        dense = layer_model(dense_builder(np.ascontiguousarray(weight, dtype=np.float32)), k, tokens)
        sparse = layer_model(groups_builder(groups, int8), k, tokens)
        _MEASURED[key] = speedup(dense, sparse, k, tokens, threads, device)
    return _MEASURED[key]
