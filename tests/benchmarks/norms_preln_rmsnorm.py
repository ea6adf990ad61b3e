"""Latency of Pre-LN graphs against their exact Pre-RMSNorm conversion, same run, same machine.

    .venv/bin/python tests/benchmarks/norms_preln_rmsnorm.py            # GPT-2-small and ViT-base
    .venv/bin/python tests/benchmarks/norms_preln_rmsnorm.py --small    # tiny configs, smoke test

Each model is built from a Hugging Face config with random weights (nothing is downloaded),
exported once, and optimized twice: the LayerNorm baseline runs cleanup + fuse-norms, the
converted graph cleanup + preln-to-rmsnorm + fuse-norms (so both get Skip norms). The two
are checked against each other on padded inputs, then timed interleaved by runtime.bench;
the table reports LN / RMS latency ratios, which is what "Pre-RMSNorm and Pre-CRMSNorm
Transformers" reports as 1-10%.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import transformers
from rich.console import Console
from rich.table import Table

from txcompile import compiler
from txcompile.exporters import export_onnx, load_model_spec
from txcompile.graph import inputs as model_inputs
from txcompile.graph import ort as rt
from txcompile.runtime import bench as benchmark

CLEANUP = ["fold-constants", "simplify-shapes", "remove-identity", "eliminate-cse", "remove-unused"]
LN_PASSES = [*CLEANUP, "fuse-norms"]
RMS_PASSES = [*CLEANUP, "preln-to-rmsnorm", "fuse-norms"]

FULL = {
    "gpt2": transformers.GPT2Config(n_embd=768, n_layer=12, n_head=12, n_positions=1024, vocab_size=50257),
    "vit": transformers.ViTConfig(
        hidden_size=768, num_hidden_layers=12, num_attention_heads=12, image_size=224
    ),
}
SMALL = {
    "gpt2": transformers.GPT2Config(n_embd=128, n_layer=2, n_head=4, n_positions=256, vocab_size=1000),
    "vit": transformers.ViTConfig(
        hidden_size=128, num_hidden_layers=2, num_attention_heads=4, intermediate_size=512, image_size=64
    ),
}
ARCHITECTURES = {"gpt2": "GPT2Model", "vit": "ViTModel"}


def build(family: str, config, folder: Path):
    """Export the family's model from ``config``; return the LN baseline and the RMS graph."""
    config.architectures = [ARCHITECTURES[family]]
    path = folder / family
    config.save_pretrained(path)
    model = load_model_spec(str(path))
    exported = export_onnx(model, exporter="torchscript", dims={"batch": 1, "seq": 16}).model
    graphs = {}
    for label, passes in (("layernorm", LN_PASSES), ("rmsnorm", RMS_PASSES)):
        settings = compiler.Settings(passes=passes, dims={"batch": 2, "seq": 16})
        outcome = compiler.optimize(exported, settings, source=family, output=str(folder / f"{label}.onnx"))
        records = {r["name"]: r for r in outcome.report["passes"]}
        if label == "rmsnorm" and records["preln-to-rmsnorm"]["status"] != "applied":
            detail = (
                records["preln-to-rmsnorm"]["details"].get("refused") or records["preln-to-rmsnorm"]["reason"]
            )
            raise SystemExit(f"{family}: preln-to-rmsnorm did not apply: {detail}")
        graphs[label] = outcome.model
    return graphs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", action="store_true", help="tiny configs (smoke test)")
    parser.add_argument("--families", default="gpt2,vit")
    parser.add_argument("--batch", default="1,8")
    parser.add_argument("--seq", default="128", help="sequence lengths for GPT-2 (ViT's is fixed)")
    parser.add_argument("--threads", type=int, default=benchmark.default_threads())
    parser.add_argument("--iters", type=int, default=30)
    parser.add_argument("--json", help="write the timings here")
    args = parser.parse_args()
    configs = SMALL if args.small else FULL
    console = Console()
    table = Table(title=f"Pre-LN vs Pre-RMSNorm, {args.threads} threads, CPU", show_edge=False)
    for column in ("model", "batch", "seq", "LN ms", "RMS ms", "LN/RMS", "max |diff|"):
        table.add_column(column, justify="left" if column == "model" else "right")
    rows = []
    with tempfile.TemporaryDirectory(prefix="txc-bench-") as tmp:
        for family in args.families.split(","):
            graphs = build(family, configs[family], Path(tmp))
            specs = model_inputs.read_specs(graphs["layernorm"])
            sessions = [(label, rt.create_session(g, threads=args.threads)) for label, g in graphs.items()]
            seqs = [int(s) for s in args.seq.split(",")] if family == "gpt2" else [0]
            for batch in (int(b) for b in args.batch.split(",")):
                for seq in seqs:
                    dims = {"batch": batch, "seq": seq or 1}
                    feeds = model_inputs.make_feeds(specs, dims)
                    outs = [rt.run(s, feeds) for _, s in sessions]
                    diff = rt.max_abs_diff(outs[0], outs[1])
                    ln, rms = benchmark.bench(sessions, feeds, dims, iters=args.iters)
                    ratio = ln.median_ms / rms.median_ms
                    rows.append(
                        {
                            "model": family,
                            **dims,
                            "ln_ms": ln.median_ms,
                            "rms_ms": rms.median_ms,
                            "ln_over_rms": ratio,
                            "max_diff": diff,
                        }
                    )
                    table.add_row(
                        family,
                        str(batch),
                        str(seq or "-"),
                        f"{ln.median_ms:.2f}",
                        f"{rms.median_ms:.2f}",
                        f"{ratio:.3f}",
                        f"{diff:.1e}",
                    )
    console.print(table)
    if args.json:
        Path(args.json).write_text(json.dumps({"threads": args.threads, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
