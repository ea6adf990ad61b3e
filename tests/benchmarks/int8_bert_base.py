"""CPU int8: BERT-base against the plain fp32 export and against quantize_dynamic(onnxscript-fused).

    .venv/bin/python tests/benchmarks/int8_bert_base.py             # BERT-base, random weights
    .venv/bin/python tests/benchmarks/int8_bert_base.py --small     # tests/data/hf/bert, a smoke test

Three graphs of one export, timed in one process on the same inputs, in alternating blocks of
runs (speedups: medians of per-round ratios, with their 10th–90th percentile range):

- plain: the export as ORT gets it (ORT's own graph optimizations on, as always);
- baseline: onnxscript's ``optimize_for_ort`` fusions, then ``quantize_dynamic`` (per-channel weights);
- txcompile: ``txcompile optimize --target cpu --precision int8`` (the whole cpu pipeline).

Reports median latency per batch at sequence 128 with 2 threads, the speedup of each over the
plain export, txcompile over the baseline, and each int8 graph's worst per-sample cosine of the
last hidden state against fp32. Issue 7's bar: txcompile ≥ 2.5× plain and faster than baseline.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import onnx
import onnx_ir as ir
from rich.console import Console
from rich.table import Table

from txcompile import compiler
from txcompile.graph import inputs as model_inputs
from txcompile.graph import ort as rt
from txcompile.passes.targets.quantize import cosine
from txcompile.runtime import bench

SMALL_CONFIG = Path(__file__).resolve().parents[1] / "data" / "hf" / "bert"


def export_bert(small: bool) -> onnx.ModelProto:
    from transformers import BertConfig

    from txcompile.exporters import export_onnx, load_model_spec

    with tempfile.TemporaryDirectory() as tmp:
        folder = SMALL_CONFIG
        if not small:
            folder = Path(tmp)
            BertConfig(architectures=["BertModel"]).save_pretrained(folder)  # defaults are BERT-base
        return export_onnx(load_model_spec(str(folder)), dims={"batch": 1, "seq": 128}).model


def onnxscript_int8(plain: onnx.ModelProto) -> onnx.ModelProto:
    """onnxscript's fusions, then onnxruntime's quantize_dynamic, per-channel int8 weights
    (its stronger setting: per-tensor weights lose more and run no faster)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from onnxscript.rewriter.ort_fusions import optimize_for_ort

    fused, counts = optimize_for_ort(ir.serde.deserialize_model(plain))
    print(f"onnxscript fusions: {counts}")
    with tempfile.TemporaryDirectory() as folder:
        output = Path(folder) / "int8.onnx"
        quantize_dynamic(
            ir.serde.serialize_model(fused),
            output,
            op_types_to_quantize=["MatMul", "Gemm"],
            weight_type=QuantType.QInt8,
            per_channel=True,
            extra_options={"MatMulConstBOnly": True, "DefaultTensorType": onnx.TensorProto.FLOAT},
        )
        return onnx.load(output)


def txcompile_int8(plain: onnx.ModelProto, min_cosine: float | None) -> onnx.ModelProto:
    settings = compiler.Settings(
        target="cpu",
        dims={"batch": 2, "seq": 16},
        flags={"precision": "int8", "min_cosine": min_cosine},
    )
    outcome = compiler.optimize(plain, settings, source="bert-base", output="int8.onnx")
    for record in outcome.report["passes"]:
        if record["status"] != "unchanged":
            print(f"  {record['name']}: {record['status']} {record['rule_counts']} {record['reason'] or ''}")
    return outcome.model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", action="store_true", help="the tiny BERT config: a smoke test")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--iters", type=int, default=30)
    parser.add_argument("--per-block", type=int, default=3, help="timed runs per block (after one untimed)")
    parser.add_argument("--min-cosine", type=float, help="passed to the quantize pass")
    parser.add_argument("--json", help="write the numbers here")
    args = parser.parse_args()
    console = Console(width=120)

    plain = export_bert(args.small)
    models = {
        "plain fp32": plain,
        "quantize_dynamic(onnxscript)": onnxscript_int8(plain),
        "txcompile int8": txcompile_int8(plain, args.min_cosine),
    }
    sessions = [(name, rt.create_session(model, threads=args.threads)) for name, model in models.items()]
    specs = model_inputs.read_specs(plain)
    table = Table(
        title=f"BERT{'-tiny' if args.small else '-base'} CPU, {args.threads} threads, seq {args.seq}"
    )
    for column in ("batch", "model", "median ms", "× plain (per-round range)", "cosine vs fp32"):
        table.add_column(column, justify="left" if column == "model" else "right")
    rows = []
    for batch in [int(b) for b in args.batches.split(",")]:
        dims = {"batch": batch, "seq": args.seq}
        feeds = model_inputs.make_feeds(specs, dims, seed=batch)
        reference = rt.run(sessions[0][1], feeds)
        timings = bench.bench(sessions, feeds, dims, warmup=3, iters=args.iters, per_block=args.per_block)
        for (name, session), timing in zip(sessions, timings, strict=True):
            similarity = cosine(reference, rt.run(session, feeds))
            rows.append(
                {
                    "batch": batch,
                    "model": name,
                    "median_ms": timing.median_ms,
                    "speedup": timing.paired_speedup,
                    "speedup_range": timing.paired_range,
                    "cosine": similarity,
                }
            )
            speedup = "{:.2f}× ({:.2f}–{:.2f})".format(timing.paired_speedup, *timing.paired_range)
            table.add_row(str(batch), name, f"{timing.median_ms:.2f}", speedup, f"{similarity:.5f}")
        versus = "{:.2f}× ({:.2f}–{:.2f})".format(*bench.paired_speedup(timings[1], timings[2]))
        table.add_row(str(batch), "txcompile vs quantize_dynamic", "", versus, "", style="bold")
    console.print(table)
    if args.json:
        Path(args.json).write_text(
            json.dumps({"threads": args.threads, "seq": args.seq, "rows": rows}, indent=2)
        )


if __name__ == "__main__":
    main()
