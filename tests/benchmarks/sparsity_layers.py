"""Per-layer speed of sparse-matmul against dense fp32, BERT-base linear shapes, same run.

    .venv/bin/python tests/benchmarks/sparsity_layers.py            # full: 768->3072, 3072->768
    .venv/bin/python tests/benchmarks/sparsity_layers.py --small    # smoke test, seconds
    .venv/bin/python tests/benchmarks/sparsity_layers.py --profile  # + where the sparse time goes

Each row builds the layer (or FFN pair: structured pruning, and column groups as they run inside
a model, staying transposed between the two layers) as an ONNX model, prunes it with
the ``prune`` pass, rewrites it with ``sparse-matmul`` (decision "always", so the table shows
the formulation even where it loses), checks the rewrite against the pruned dense graph, and
times dense and rewritten in alternating blocks in one process (runtime/bench.py). Speedups are
medians of per-round ratios from the same run, with their 10th-90th percentile range.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import tempfile

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper
from rich.console import Console
from rich.table import Table

from txcompile.graph import ort as rt
from txcompile.pass_manager import APPLIED, PassManager
from txcompile.passes.base import PassContext
from txcompile.passes.sparsity import Prune, SparseMatMul
from txcompile.runtime import bench

FULL = {"shapes": [(768, 3072), (3072, 768)], "tokens": [16, 512]}
SMALL = {"shapes": [(128, 512), (512, 128)], "tokens": [16, 64]}
TARGETS = {"fp32 1x32": 3.0, "int8 1x32": 8.0, "structured": 7.0}
PAIRS = ("fp32 1x32 FFN", "structured")  # up -> Gelu -> down: how the layers run inside a model


def linear_model(k: int, n: int, seed: int = 0) -> onnx.ModelProto:
    weight = (np.random.default_rng(seed).standard_normal((k, n)) / np.sqrt(k)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])],
        "linear",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["tokens", k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["tokens", n])],
        [numpy_helper.from_array(weight, "w")],
    )
    return _model(graph)


def ffn_model(hidden: int, inner: int, seed: int = 0) -> onnx.ModelProto:
    """x -> MatMul(up) + bias -> Gelu -> MatMul(down): the pair structured pruning shrinks."""
    rng = np.random.default_rng(seed)
    up = (rng.standard_normal((hidden, inner)) / np.sqrt(hidden)).astype(np.float32)
    down = (rng.standard_normal((inner, hidden)) / np.sqrt(inner)).astype(np.float32)
    bias = (0.1 * rng.standard_normal(inner)).astype(np.float32)
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "up"], ["h"]),
            helper.make_node("Add", ["h", "bias"], ["hb"]),
            helper.make_node("Gelu", ["hb"], ["g"]),
            helper.make_node("MatMul", ["g", "down"], ["y"]),
        ],
        "ffn",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["tokens", hidden])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["tokens", hidden])],
        [numpy_helper.from_array(a, n) for a, n in ((up, "up"), (down, "down"), (bias, "bias"))],
    )
    return _model(graph)


def _model(graph) -> onnx.ModelProto:
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)])
    model.ir_version = 9
    return model


def rewrite(model: onnx.ModelProto, feeds, sparsity: float, block: str, precision: str | None):
    """(pruned dense model, rewritten model, max diff rewritten vs pruned)."""
    options = {
        "sparsity": sparsity,
        "block": block,
        "balanced": True,
        "prune_final": True,  # a lone layer is its graph's final projection
        "sparse_decision": "always",
        "precision": precision,
    }
    context = PassContext(feeds=feeds, flags=options)
    pruned = PassManager([Prune(context)]).run(model, feeds)
    result = PassManager([SparseMatMul(context)], atol=1e-4).run(pruned.model, feeds)
    record = result.records[0]
    if record.status != APPLIED:
        raise SystemExit(f"sparse-matmul did not apply: {record.reason}")
    return pruned.model, result.model, record.max_diff


def op_times(model: onnx.ModelProto, feeds, threads: int, runs: int = 100) -> list[tuple[str, float]]:
    """(op type, median ms per run) of each node of ``model``, from ORT's profiler, in run order."""
    options = rt.session_options(threads)
    options.enable_profiling = True
    with tempfile.TemporaryDirectory(prefix="txcompile-profile-") as folder:
        options.profile_file_prefix = os.path.join(folder, "layer")
        session = ort.InferenceSession(model.SerializeToString(), options, providers=rt.PROVIDERS["cpu"])
        for _ in range(runs):
            session.run(None, feeds)
        with open(session.end_profiling()) as trace:
            events = json.load(trace)
    per_node: dict[tuple[str, str], list[float]] = collections.defaultdict(list)
    for event in events:
        if event.get("cat") == "Node" and event["name"].endswith("_kernel_time"):
            per_node[(event["name"], event["args"]["op_name"])].append(event["dur"] / 1000)
    return [(op, float(np.median(times[runs // 4 :]))) for (_, op), times in per_node.items()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", action="store_true", help="small shapes: a smoke test")
    parser.add_argument("--sparsity", type=float, default=0.9)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--runs", type=int, default=60, help="timed runs per side")
    parser.add_argument("--per-block", type=int, default=3, help="timed runs per block (after one untimed)")
    parser.add_argument("--profile", action="store_true", help="also print the sparse graph's time per node")
    args = parser.parse_args()
    sizes = SMALL if args.small else FULL
    table = Table(
        title=f"sparse-matmul per layer, {args.sparsity:.0%} sparse, {args.threads} threads, ORT CPU"
    )
    for column in ("layer", "form", "M", "dense ms", "sparse ms", "speedup", "range", "target", "max diff"):
        table.add_column(column, justify="left" if column in ("layer", "form") else "right")
    profiles = []
    for k, n in sizes["shapes"]:
        cases = [
            ("fp32 1x32", linear_model(k, n), "1x32", None),
            ("int8 1x32", linear_model(k, n), "1x32", "int8"),
        ]
        if k < n:  # the FFN pair whose first layer has this shape: both layers in one graph
            cases.append(("fp32 1x32 FFN", ffn_model(k, n), "1x32", None))
            cases.append(("structured", ffn_model(k, n), "neuron", None))
        for form, model, block, precision in cases:
            for tokens in sizes["tokens"]:
                x = np.random.default_rng(1).standard_normal((tokens, k)).astype(np.float32)
                dense, sparse, diff = rewrite(model, {"x": x}, args.sparsity, block, precision)
                sessions = [
                    (name, rt.create_session(m, threads=args.threads))
                    for name, m in (("dense", dense), ("sparse", sparse))
                ]
                dense_t, sparse_t = bench.bench(
                    sessions, {"x": x}, {"tokens": tokens}, iters=args.runs, per_block=args.per_block
                )
                label = f"{k}->{n}" + (f"->{k}" if form in PAIRS else "")
                table.add_row(
                    label,
                    form,
                    str(tokens),
                    f"{dense_t.median_ms:.3f}",
                    f"{sparse_t.median_ms:.3f}",
                    f"{sparse_t.paired_speedup:.2f}x",
                    "{:.2f}-{:.2f}".format(*sparse_t.paired_range),
                    f">= {TARGETS[form]:.0f}x" if form in TARGETS else "-",
                    f"{diff:.2g}",
                )
                if args.profile:
                    nodes = op_times(sparse, {"x": x}, args.threads)
                    cost = " + ".join(f"{op} {ms:.3f}" for op, ms in nodes)
                    total = sum(ms for _, ms in nodes)
                    profiles.append(f"{label} {form} M={tokens}: {total:.3f} ms = {cost}")
    Console(width=140).print(table)
    print(
        "dense: the pruned weights run as a plain MatMul; speedup: median over rounds of dense / sparse"
        " block medians, range: its 10th-90th percentile; max diff: rewritten vs pruned dense graph"
    )
    if profiles:
        print("\nsparse graph, median ms per node (ORT's profiler, in run order):")
        print("\n".join(profiles))


if __name__ == "__main__":
    main()
