"""End to end: BERT-base with every encoder linear layer 90% block-sparse, against the dense graph.

    .venv/bin/python tests/benchmarks/sparsity_bert.py                 # BERT-base (random weights)
    .venv/bin/python tests/benchmarks/sparsity_bert.py --small         # tests/data/hf/bert, seconds
    .venv/bin/python tests/benchmarks/sparsity_bert.py --precision int8
    .venv/bin/python tests/benchmarks/sparsity_bert.py --pipeline      # also the whole CPU pipeline

The model is built from a config with random weights (no hub) and exported by txcompile. The
baseline is that export pruned the same way but left dense (what ORT does with a pruned model);
the candidate is the same pruned model after sparse-matmul; with --pipeline, also what
`txcompile optimize --sparsity` writes (cleanup, prune, sparse-matmul, then the fusions, which
turn each unfused attention core into MultiHeadAttention). All run in ORT with all graph
optimizations, timed in alternating blocks in one process; the speedup is the median of
per-round ratios (runtime/bench.py), with its 10th-90th percentile range.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from rich.console import Console
from rich.table import Table

from txcompile import compiler
from txcompile.graph import inputs as model_inputs
from txcompile.graph import ort as rt
from txcompile.pass_manager import APPLIED, PassManager
from txcompile.passes.base import PassContext
from txcompile.passes.sparsity import Prune, SparseMatMul
from txcompile.runtime import bench

SMALL_CONFIG = Path(__file__).resolve().parents[1] / "data" / "hf" / "bert"


def bert_base_folder(folder: Path) -> Path:
    from transformers import BertConfig

    BertConfig(architectures=["BertModel"]).save_pretrained(folder)  # defaults are BERT-base
    return folder


def export(folder: Path, seq: int):
    from txcompile.exporters import export_onnx, load_model_spec

    return export_onnx(load_model_spec(str(folder)), dims={"batch": 1, "seq": seq}).model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", action="store_true", help="the tiny BERT config: a smoke test")
    parser.add_argument("--sparsity", type=float, default=0.9)
    parser.add_argument("--block", default="1x32")
    parser.add_argument("--precision", choices=["fp32", "int8"], default="fp32")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--shapes", default="1x128,8x128", help="batch x seq to time, comma-separated")
    parser.add_argument("--runs", type=int, default=15, help="timed runs per side (blocks of 3)")
    parser.add_argument("--pipeline", action="store_true", help="also time the whole --target cpu pipeline")
    args = parser.parse_args()
    console = Console(width=140)
    with tempfile.TemporaryDirectory() as tmp:
        folder = SMALL_CONFIG if args.small else bert_base_folder(Path(tmp))
        model = export(folder, seq=16)
    specs = model_inputs.read_specs(model)
    feeds = model_inputs.make_feeds(specs, {"batch": 2, "seq": 16})
    options = {
        "sparsity": args.sparsity,
        "block": args.block,
        "balanced": True,
        # the tiny config's layers are never faster sparse: its smoke run rewrites them anyway
        "sparse_decision": "always" if args.small else "measure",
        "precision": args.precision,
        "threads": args.threads,
    }
    context = PassContext(feeds=feeds, flags=options)
    pruned = PassManager([Prune(context)]).run(model, feeds)
    prune_record = pruned.records[0]
    rewritten = PassManager([SparseMatMul(context)]).run(pruned.model, feeds)
    record = rewritten.records[0]
    if record.status != APPLIED:
        raise SystemExit(f"sparse-matmul: {record.status} {record.reason or ''}")
    layers = record.details["layers"]
    sparse_layers = [layer for layer in layers if layer["pattern"] != "dense"]
    console.print(
        f"pruned {len([x for x in prune_record.details['layers'] if 'zeroed' in x])} linear layers to "
        f"{args.sparsity:.0%} ({args.block}, balanced); sparse-matmul rewrote {len(sparse_layers)} of "
        f"{len(layers)}; max diff vs pruned dense {record.max_diff:.2g}"
    )
    for layer in layers:
        if layer["pattern"] == "dense":
            console.print(f"  dense: {layer['layer']} {layer.get('reason', '')}")
    candidates = [("dense", pruned.model), ("sparse-matmul", rewritten.model)]
    if args.pipeline:
        settings = compiler.Settings(target="cpu", flags=options)
        whole = compiler.optimize(model, settings, source="bert", output="bert-sparse.onnx").model
        candidates.append(("pipeline", whole))
    table = Table(title=f"BERT end to end, {args.threads} threads, ORT CPU, {args.precision}")
    table.add_column("batch x seq", justify="right")
    table.add_column("dense pruned ms", justify="right")
    for name, _ in candidates[1:]:
        table.add_column(f"{name} ms (speedup, per-round range)", justify="right")
    sessions = [(name, rt.create_session(m, threads=args.threads)) for name, m in candidates]
    for shape in args.shapes.split(","):
        batch, seq = (int(v) for v in shape.split("x"))
        dims = {"batch": batch, "seq": seq}
        run_feeds = model_inputs.make_feeds(specs, dims)
        dense, *others = bench.bench(sessions, run_feeds, dims, iters=args.runs, per_block=3)
        cells = [
            f"{t.median_ms:.1f} ({t.paired_speedup:.2f}x, {t.paired_range[0]:.2f}-{t.paired_range[1]:.2f})"
            for t in others
        ]
        table.add_row(shape, f"{dense.median_ms:.1f}", *cells)
    console.print(table)
    reference = rt.run(sessions[0][1], feeds)
    for name, session in sessions[1:]:
        diff = rt.max_abs_diff(reference, rt.run(session, feeds))
        console.print(f"check: max diff {name} vs pruned dense on the verification inputs {diff:.2g}")
        if args.precision == "fp32" and not diff <= 1e-3:
            raise SystemExit(f"{name}: the rewritten model does not match the pruned dense one")


if __name__ == "__main__":
    main()
