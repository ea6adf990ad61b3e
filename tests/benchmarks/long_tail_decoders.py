"""Mistral- and BLOOM-style models on ORT CPU: the plain export vs onnxscript's ORT fusions vs
txcompile, one run per model (the long-tail variants: sliding-window GQA with RoPE; ALiBi over
folded heads with BLOOM's GELU).

Random-weight base models (no LM head), hidden 1024, 8 layers, exported once with dynamo; the
graphs are timed on the same padded inputs in alternating blocks (runtime/bench.py), speedups
are medians of per-round ratios with their 10th–90th percentile range.

    .venv/bin/python tests/benchmarks/long_tail_decoders.py                 # full size
    .venv/bin/python tests/benchmarks/long_tail_decoders.py --smoke         # tiny, seconds
    .venv/bin/python tests/benchmarks/long_tail_decoders.py --model bloom --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path

from attention_bert_base import compare, onnxscript_fused, ours
from rich.console import Console

SIZES = {
    "mistral": (
        "MistralConfig",
        "MistralModel",
        {
            "vocab_size": 32000,
            "hidden_size": 1024,
            "intermediate_size": 2816,
            "num_hidden_layers": 8,
            "num_attention_heads": 16,
            "num_key_value_heads": 8,
            "sliding_window": 4096,
        },
    ),
    "bloom": (
        "BloomConfig",
        "BloomModel",
        {"vocab_size": 32000, "hidden_size": 1024, "n_layer": 8, "n_head": 16},
    ),
}
SMOKE = {
    "mistral": {"hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2, "num_attention_heads": 4},
    "bloom": {"hidden_size": 64, "n_layer": 2, "n_head": 4},
}


def export(kind: str, smoke: bool, folder: Path):
    import transformers

    from txcompile.exporters import export_onnx, load_model_spec

    config_class, architecture, fields = SIZES[kind]
    fields = {**fields, **(SMOKE[kind] if smoke else {})}
    if kind == "mistral" and smoke:
        fields["num_key_value_heads"] = 2
    config = getattr(transformers, config_class)(**fields, architectures=[architecture])
    config.save_pretrained(folder)
    torch_model = load_model_spec(str(folder), task="feature-extraction")
    return export_onnx(torch_model, exporter="dynamo", dims={"batch": 2, "seq": 16}).model


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--smoke", action="store_true", help="tiny models, batch 1, seq 16: checks the script"
    )
    parser.add_argument("--model", default="mistral,bloom")
    parser.add_argument("--batch", default="1,8")
    parser.add_argument("--seq", default="128")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--per-block", type=int, default=2, help="timed runs per block (after one untimed)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--json", help="also write the timings here")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    console = Console(highlight=False)
    batches = [1] if args.smoke else [int(b) for b in args.batch.split(",")]
    seqs = [16] if args.smoke else [int(s) for s in args.seq.split(",")]
    results = {}
    for kind in args.model.split(","):
        with tempfile.TemporaryDirectory(prefix="txcompile-bench-") as tmp:
            plain = export(kind, args.smoke, Path(tmp))
        candidates = [("plain export", plain, "ORT's own graph optimizations only")]
        fused, note = onnxscript_fused(plain)
        if fused is not None:
            candidates.append(("onnxscript optimize_for_ort", fused, note))
        else:
            console.print(f"onnxscript optimize_for_ort: not timed ({note})")
        candidates.append(("txcompile --target cpu", *ours(plain)))
        dims = [{"batch": batch, "seq": seq} for batch in batches for seq in seqs]
        title = f"{kind} (dynamo, hidden {1024 if not args.smoke else 64}), ORT CPU, {args.threads} threads"
        results[kind] = compare(console, candidates, plain, dims, title, args)
    if args.json:
        Path(args.json).write_text(json.dumps({"threads": args.threads, "timings": results}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
