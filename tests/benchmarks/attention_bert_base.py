"""BERT-base latency on ORT CPU: the plain export vs onnxscript's ORT fusions vs txcompile, one run.

A random-weight BERT-base (Hugging Face config: 768 wide, 12 layers, 12 heads) is exported
once; the graphs are timed on the same padded inputs with the same session options, in
alternating blocks of runs (runtime/bench.py). Speedups are medians of per-round ratios — each
round's blocks ran seconds apart, so the machine's drift cancels — with their 10th–90th
percentile range, so "faster" and "within noise" can be told apart.

    .venv/bin/python tests/benchmarks/attention_bert_base.py                 # full size
    .venv/bin/python tests/benchmarks/attention_bert_base.py --smoke         # tiny, seconds
    .venv/bin/python tests/benchmarks/attention_bert_base.py --exporter torchscript --json out.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import tempfile
from pathlib import Path

import onnx
import onnx_ir as ir
from rich.console import Console
from rich.table import Table

from txcompile import compiler
from txcompile.graph import inputs as model_inputs
from txcompile.graph import ort as rt
from txcompile.runtime import bench as benchmark

BERT_BASE = {
    "hidden_size": 768,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "intermediate_size": 3072,
}
SMOKE = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 128}


def write_config(folder: Path, size: dict) -> Path:
    import transformers

    config = transformers.BertConfig(vocab_size=30522, max_position_embeddings=512, **size)
    config.save_pretrained(folder)
    return folder


def export(folder: Path, exporter: str, attn: str | None) -> onnx.ModelProto:
    from txcompile.exporters import export_onnx, load_model_spec

    torch_model = load_model_spec(str(folder), attn_implementation=attn)
    return export_onnx(torch_model, exporter=exporter, dims={"batch": 2, "seq": 16}).model


def onnxscript_fused(model: onnx.ModelProto) -> tuple[onnx.ModelProto | None, str]:
    """onnxscript's ORT fusions, or None and why (they raise or emit graphs ORT cannot load)."""
    from onnxscript.rewriter.ort_fusions import optimize_for_ort

    copy = onnx.ModelProto()
    copy.CopyFrom(model)  # the fusions would edit the proto the IR model was read from
    try:
        fused, counts = optimize_for_ort(ir.serde.deserialize_model(copy))
        proto = ir.serde.serialize_model(fused)
        rt.create_session(proto)
    except Exception as err:  # reported, not fatal: the table shows what ran
        return None, f"{type(err).__name__}: {str(err).splitlines()[0][:120]}"
    return proto, ", ".join(f"{k}×{v}" for k, v in counts.items() if v) or "nothing fused"


def ours(model: onnx.ModelProto, **options) -> tuple[onnx.ModelProto, str]:
    settings = compiler.Settings(target="cpu", flags=options)
    outcome = compiler.optimize(model, settings, source="bert-base", output="ours.onnx")
    if outcome.passed is False:
        raise SystemExit("txcompile's graph failed verification")
    after = outcome.report["ops"]["after"]
    fused = {k: v for k, v in after.items() if k.startswith("com.microsoft") or k == "Attention"}
    return outcome.model, ", ".join(f"{k.split('.')[-1]}×{v}" for k, v in fused.items())


def compare(
    console: Console, candidates: list, plain: onnx.ModelProto, dims_list: list[dict], title: str, args
) -> list:
    """Time ``candidates`` ((name, model, what)) interleaved at each dims, print the table, return
    its rows; the first candidate is the baseline every other is checked against (1e-3)."""
    for name, _, what in candidates:
        console.print(f"{name}: {what}")
    sessions = [(name, rt.create_session(model, threads=args.threads)) for name, model, _ in candidates]
    specs = model_inputs.read_specs(plain)
    table = Table(title=title, show_edge=False)
    columns = ("batch", "seq", "graph", "median ms", "p90 ms", "vs plain", "vs onnxscript (per-round range)")
    for column in columns:
        table.add_column(column, justify="left" if column == "graph" else "right")
    rows = []
    for dims in dims_list:
        feeds = model_inputs.make_feeds(specs, dims)
        reference = rt.run(sessions[0][1], feeds)
        for (name, session), (_, model, _) in zip(sessions[1:], candidates[1:], strict=True):
            diff = rt.max_abs_diff(reference, rt.run(session, feeds), rt.padded_rows(model, feeds))
            if not diff <= 1e-3:
                console.print(f"warning: {name} differs from the plain export by {diff:.3g} at {dims}")
        timings = benchmark.bench(
            sessions, feeds, dims, warmup=args.warmup, iters=args.iters, per_block=args.per_block
        )
        theirs = next((t for t in timings if t.model.startswith("onnxscript")), None)
        for timing in timings:
            rows.append(dataclasses.asdict(timing))
            versus = ""
            if theirs is not None and timing.model.startswith("txcompile"):
                middle, low, high = benchmark.paired_speedup(theirs, timing)
                versus = f"{middle:.3f}× ({low:.2f}–{high:.2f})"
                rows[-1]["vs_onnxscript"] = [middle, low, high]
            table.add_row(
                str(dims["batch"]),
                str(dims["seq"]),
                timing.model,
                f"{timing.median_ms:.2f}",
                f"{timing.p90_ms:.2f}",
                f"{timing.paired_speedup:.2f}×",
                versus,
            )
    console.print(table)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny model, batch 1, seq 16: checks the script")
    parser.add_argument("--exporter", default="dynamo", choices=["dynamo", "torchscript"])
    parser.add_argument("--attn", default=None, choices=["eager", "sdpa"], help="HF attention implementation")
    parser.add_argument("--batch", default="1,8")
    parser.add_argument("--seq", default="128,512")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--iters", type=int, default=30)
    parser.add_argument("--per-block", type=int, default=2, help="timed runs per block (after one untimed)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--remove-padding", action="store_true", help="also time txcompile --remove-padding")
    parser.add_argument("--json", help="also write the timings here")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    console = Console(highlight=False)
    batches = [1] if args.smoke else [int(b) for b in args.batch.split(",")]
    seqs = [16] if args.smoke else [int(s) for s in args.seq.split(",")]
    with tempfile.TemporaryDirectory(prefix="txcompile-bench-") as tmp:
        folder = write_config(Path(tmp), SMOKE if args.smoke else BERT_BASE)
        plain = export(folder, args.exporter, args.attn)
    candidates = [("plain export", plain, "ORT's own graph optimizations only")]
    fused, note = onnxscript_fused(plain)
    if fused is not None:
        candidates.append(("onnxscript optimize_for_ort", fused, note))
    else:
        console.print(f"onnxscript optimize_for_ort: not timed ({note})")
    mine, mine_note = ours(plain)
    candidates.append(("txcompile --target cpu", mine, mine_note))
    if args.remove_padding:  # zeros at padded positions: compared on real tokens only
        unpadded, _ = ours(plain, remove_padding=True)
        candidates.append(("txcompile --remove-padding", unpadded, "per-token work on real tokens only"))
    dims = [{"batch": batch, "seq": seq} for batch in batches for seq in seqs]
    title = f"BERT ({args.exporter}), ORT CPU, {args.threads} threads"
    rows = compare(console, candidates, plain, dims, title, args)
    if args.json:
        Path(args.json).write_text(json.dumps({"threads": args.threads, "timings": rows}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
