"""Wall time and peak memory of `txcompile optimize` against onnxscript on real-size models,
and of `txcompile compile` / `run` / `bench` on a 1.1B decoder.

Each model (random weights, Hugging Face config) is exported once with `txcompile export`;
then, one process each, in turn: onnxscript (`ir.load` → `optimizer.optimize` →
`optimize_for_ort` → `ir.save` with external data, which streams the weights), `txcompile
optimize` with verification, and with `--no-verify`. Peak memory is the child's maximum
resident set (wait4), so imports count for every candidate alike.

The compile rows take a Hugging Face folder through `txcompile compile` (export, verification
against PyTorch at every pass, the decode steps), then run and bench the result; the weights'
size is that of the compiled model's files.

    .venv/bin/python tests/benchmarks/compile_memory.py      # optimize: bert-base, bert-large,
                                                             # llama-0.5b; compile: tinyllama-1.1b
    .venv/bin/python tests/benchmarks/compile_memory.py --models bert-base --compile "" --rounds 5
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from txcompile import render

MODELS = {
    "bert-base": ("BertConfig", {"architectures": ["BertModel"]}),
    "bert-large": (
        "BertConfig",
        {
            "architectures": ["BertModel"],
            "hidden_size": 1024,
            "num_hidden_layers": 24,
            "num_attention_heads": 16,
            "intermediate_size": 4096,
        },
    ),
    "llama-0.5b": (
        "LlamaConfig",
        {
            "architectures": ["LlamaModel"],
            "hidden_size": 1024,
            "intermediate_size": 2816,
            "num_hidden_layers": 24,
            "num_attention_heads": 16,
            "num_key_value_heads": 8,
            "vocab_size": 151936,
            "max_position_embeddings": 2048,
        },
    ),
}

COMPILED = {  # TinyLlama's shape: 1.1B parameters, 4.4 GB in fp32
    "tinyllama-1.1b": (
        "LlamaConfig",
        {
            "architectures": ["LlamaForCausalLM"],
            "hidden_size": 2048,
            "intermediate_size": 5632,
            "num_hidden_layers": 22,
            "num_attention_heads": 32,
            "num_key_value_heads": 4,
            "vocab_size": 32000,
            "max_position_embeddings": 2048,
            "tie_word_embeddings": False,
        },
    ),
}

ONNXSCRIPT = """
import sys, onnx_ir as ir, onnxscript
from onnxscript.rewriter.ort_fusions import optimize_for_ort
model = ir.load(sys.argv[1])
onnxscript.optimizer.optimize(model)
optimize_for_ort(model)
ir.save(model, sys.argv[2], external_data=sys.argv[3])
"""


def measured(command: list[str]) -> tuple[float, float]:
    """(wall seconds, peak RSS GiB) of one child process, which must succeed."""
    start = time.perf_counter()
    child = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(child.pid, 0)
    seconds = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{' '.join(command)} failed: {child.stderr.read().decode()[-2000:]}")
    return seconds, usage.ru_maxrss / 2**20


def weights_gib(path: Path) -> float:
    return sum(p.stat().st_size for p in path.parent.glob(path.name + "*")) / 2**30


def hf_folder(name: str, work: Path, configs: dict) -> Path:
    import transformers

    folder = work / name
    if not (folder / "config.json").exists():
        config_class, fields = configs[name]
        getattr(transformers, config_class)(**fields).save_pretrained(folder)
    return folder


def export(name: str, work: Path) -> Path:
    folder, plain = hf_folder(name, work, MODELS), work / f"{name}.onnx"
    if not plain.exists():
        txcompile = [sys.executable, "-m", "txcompile"]
        subprocess.run([*txcompile, "export", str(folder), "-o", str(plain)], check=True, capture_output=True)
    return plain


def compiled_rows(name: str, work: Path) -> list[dict]:
    """compile, then run and bench the compiled model: seconds, peak, fused attention sites."""
    folder, out = hf_folder(name, work, COMPILED), work / f"{name}.compiled" / "model.onnx"
    out.parent.mkdir(exist_ok=True)
    for stale in out.parent.iterdir():
        stale.unlink()
    txcompile = [sys.executable, "-m", "txcompile"]
    steps = {
        "compile": [*txcompile, "compile", str(folder), "-o", str(out)],
        "run": [*txcompile, "run", str(out)],
        "bench --batch 1 --seq 32": [*txcompile, "bench", str(out), "--batch", "1", "--seq", "32"],
    }
    timings = {label: measured(command) for label, command in steps.items()}
    size = weights_gib(out)
    report = json.loads(out.with_name("model.report.json").read_text())
    sites = render.attention_coverage(report)
    fused = sum(1 for site in sites if site.get("status") == "fused")
    return [
        {
            "model": name,
            "weights_gib": round(size, 3),
            "tool": f"txcompile {label}",
            "seconds": round(seconds, 2),
            "peak_gib": round(gib, 3),
            "memory_vs_weights": round(gib / size, 2),
            "attention_fused": f"{fused}/{len(sites)}" if label == "compile" else "",
            "verified": str(report["verification"]["passed"]) if label == "compile" else "",
        }
        for label, (seconds, gib) in timings.items()
    ]


def print_table(title: str, rows: list[dict]) -> None:
    table = Table(title=title)
    for column in rows[0]:
        table.add_column(column)
    for row in rows:
        table.add_row(*(str(v) for v in row.values()))
    Console().print(table)


def interleaved(runs: dict[str, list[str]], rounds: int) -> dict[str, tuple[float, float]]:
    """(median wall seconds, largest peak GiB) per label, the commands run in turn ``rounds``
    times, so the machine's drift reaches every tool alike."""
    samples: dict[str, list[tuple[float, float]]] = {label: [] for label in runs}
    for _ in range(rounds):
        for label, command in runs.items():
            samples[label].append(measured(command))
    return {
        label: (statistics.median(s for s, _ in got), max(g for _, g in got))
        for label, got in samples.items()
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(MODELS), help="optimize rows; '' for none")
    parser.add_argument("--compile", default=",".join(COMPILED), help="compile rows; '' for none")
    parser.add_argument("--work", default=None, help="folder for the exports (kept between runs)")
    parser.add_argument(
        "--rounds", type=int, default=1, help="optimize runs per tool, interleaved; medians reported"
    )
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    work = Path(args.work or tempfile.mkdtemp(prefix="compile-memory-"))
    work.mkdir(parents=True, exist_ok=True)
    rows, compiled = [], []
    for name in filter(None, args.models.split(",")):
        plain = export(name, work)
        size = weights_gib(plain)
        out = work / f"{name}.out"
        out.mkdir(exist_ok=True)
        txcompile = [sys.executable, "-m", "txcompile", "optimize", str(plain)]
        runs = {
            "onnxscript": [
                sys.executable,
                "-c",
                ONNXSCRIPT,
                str(plain),
                str(out / "os.onnx"),
                "os.onnx.data",
            ],
            "txcompile": [*txcompile, "-o", str(out / "tx.onnx")],
            "txcompile --no-verify": [*txcompile, "-o", str(out / "txnv.onnx"), "--no-verify"],
        }
        timings = interleaved(runs, args.rounds)
        peer_s, peer_gib = timings["onnxscript"]
        for label, (seconds, gib) in timings.items():
            rows.append(
                {
                    "model": name,
                    "weights_gib": round(size, 3),
                    "tool": label,
                    "seconds": round(seconds, 2),
                    "peak_gib": round(gib, 3),
                    "time_vs_onnxscript": round(seconds / peer_s, 2),
                    "memory_vs_weights": round(gib / size, 2),
                    "memory_vs_onnxscript": round(gib / peer_gib, 2),
                }
            )
    for name in filter(None, args.compile.split(",")):
        compiled += compiled_rows(name, work)
    if rows:
        runs = "one run each" if args.rounds == 1 else f"median of {args.rounds} interleaved runs each"
        print_table(f"optimize: wall time and peak RSS ({runs})", rows)
    if compiled:
        print_table("compile, run, bench: wall time and peak RSS (one run each)", compiled)
    if args.json:
        Path(args.json).write_text(json.dumps({"optimize": rows, "compile": compiled}, indent=2))


if __name__ == "__main__":
    main()
