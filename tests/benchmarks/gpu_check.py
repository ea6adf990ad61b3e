"""GPU check: `--target gpu` against the plain export in ORT's CUDA EP, with I/O binding, one run.

    python tests/benchmarks/gpu_check.py                    # BERT-base + LLaMA-style decoder
    python tests/benchmarks/gpu_check.py --models bert      # just BERT-base
    python tests/benchmarks/gpu_check.py --json gpu.json

Needs a CUDA machine with onnxruntime-gpu (and torch, transformers for the export). Both models
are built from configs with random weights (no hub), exported by txcompile, and compiled with
the gpu pipeline (fp16 by default, kernel-checked against the CUDA table). Each graph is timed
with inputs and outputs bound on the device (no host copies inside the timed region):

- BERT-base, batch 8, sequence 512, a quarter of every row but the first padded (issue 7's
  bar: ≤ 1.8 ms on an H100, max error ≤ 2e-2 against fp32 on the real tokens), with padding
  removal (PackedAttention; the default) and without it;
- a LLaMA-style decoder (GQA, RoPE, RMSNorm), prefill batch 1 × 512 and batch 8 × 128.

If torch sees the GPU, the PyTorch fp16 module is timed too, as a reference.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

BERT = {"architectures": ["BertModel"]}  # transformers' defaults are BERT-base
LLAMA = {
    "architectures": ["LlamaForCausalLM"],
    "hidden_size": 1024,
    "intermediate_size": 2816,
    "num_hidden_layers": 8,
    "num_attention_heads": 16,
    "num_key_value_heads": 4,
    "vocab_size": 32000,
    "max_position_embeddings": 2048,
}
SHAPES = {"bert": [(8, 512)], "llama": [(1, 512), (8, 128)]}


def check_cuda() -> None:
    import onnxruntime as ort

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        sys.exit(
            f"gpu_check: onnxruntime {ort.__version__} has no CUDAExecutionProvider "
            "(pip install onnxruntime-gpu)"
        )


def build(name: str, folder: Path):
    import transformers

    from txcompile.exporters import export_onnx, load_model_spec

    config_class = transformers.LlamaConfig if name == "llama" else transformers.BertConfig
    config_class(**(LLAMA if name == "llama" else BERT)).save_pretrained(folder)
    torch_model = load_model_spec(str(folder))
    started = time.perf_counter()
    result = export_onnx(torch_model, dims={"batch": 2, "seq": 16})
    print(f"{name}: exported with {result.exporter} in {time.perf_counter() - started:.0f} s")
    return torch_model, result.model


def compile_gpu(name: str, plain, precision: str, attention_op: str = "ms", disable=()):
    from txcompile import compiler, render

    options = {"precision": precision, "attention_op": attention_op}
    settings = compiler.Settings(target="gpu", dims={"batch": 2, "seq": 16}, disable=disable, flags=options)
    outcome = compiler.optimize(plain, settings, source=name, output=f"{name}-gpu.onnx")
    for record in outcome.report["passes"]:
        if record["status"] != "unchanged":
            note = record["reason"] or ""
            print(
                f"  {record['name']}: {record['status']} {record['rule_counts']} "
                f"max diff {record['max_diff']} {note}"
            )
    for line in render.kernel_lines(outcome.report):
        print(f"  {line}")
    return outcome.model


def io_bound_ms(session, feeds: dict[str, np.ndarray], warmup: int, iters: int):
    """Median ms per call with every input and output on the GPU; also the outputs."""
    import onnxruntime as ort

    binding = session.io_binding()
    wanted = {i.name for i in session.get_inputs()}
    for name, value in feeds.items():
        if name in wanted:
            binding.bind_ortvalue_input(name, ort.OrtValue.ortvalue_from_numpy(value, "cuda", 0))
    for output in session.get_outputs():
        binding.bind_output(output.name, "cuda")
    for _ in range(warmup):
        session.run_with_iobinding(binding)
    binding.synchronize_outputs()
    samples = []
    for _ in range(iters):
        begin = time.perf_counter()
        session.run_with_iobinding(binding)
        binding.synchronize_outputs()
        samples.append((time.perf_counter() - begin) * 1000)
    return statistics.median(samples), binding.copy_outputs_to_cpu()


def torch_fp16_ms(torch_model, feeds, warmup: int, iters: int) -> float | None:
    try:
        import torch
    except ImportError:
        return None
    if not torch.cuda.is_available():
        return None
    module = torch_model.module.half().cuda().eval()
    args = [torch.from_numpy(feeds[s.name]).cuda() for s in torch_model.inputs]
    with torch.inference_mode():
        for _ in range(warmup):
            module(*args)
        torch.cuda.synchronize()
        samples = []
        for _ in range(iters):
            begin = time.perf_counter()
            module(*args)
            torch.cuda.synchronize()
            samples.append((time.perf_counter() - begin) * 1000)
    module.float().cpu()
    return statistics.median(samples)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="bert,llama")
    parser.add_argument("--precision", default="fp16", choices=["fp16", "bf16", "fp32"])
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--iters", type=int, default=50)
    parser.add_argument("--json", help="write the numbers here")
    args = parser.parse_args()
    check_cuda()
    import onnxruntime as ort

    from txcompile.graph import inputs as model_inputs
    from txcompile.graph import ort as rt

    print(f"onnxruntime {ort.__version__}, providers {ort.get_available_providers()}")
    rows = []
    for name in args.models.split(","):
        with tempfile.TemporaryDirectory() as tmp:
            torch_model, plain = build(name, Path(tmp))
        compiled = compile_gpu(name, plain, args.precision)
        sessions = {
            "plain export": rt.create_session(plain, "cuda"),
            "txcompile": rt.create_session(compiled, "cuda"),
        }
        if name == "bert":  # the same without padding removal, to show what it saves
            padded = compile_gpu(name, plain, args.precision, disable=("remove-padding",))
            sessions["txcompile padded"] = rt.create_session(padded, "cuda")
        if name == "llama":  # causal decoder: also GroupQueryAttention on un-repeated K/V
            gqa = compile_gpu(name, plain, args.precision, attention_op="gqa")
            sessions["txcompile gqa"] = rt.create_session(gqa, "cuda")
        specs = model_inputs.read_specs(plain)
        for batch, seq in SHAPES[name]:
            feeds = model_inputs.make_feeds(specs, {"batch": batch, "seq": seq}, seed=1)
            timed = {label: io_bound_ms(s, feeds, args.warmup, args.iters) for label, s in sessions.items()}
            reference = timed["plain export"][1][0].astype(np.float64)
            # outputs padding removal leaves 0 at padded positions are compared on real tokens
            error = rt.max_abs_diff(
                {"out": reference}, {"out": timed["txcompile"][1][0]}, rt.padded_rows(compiled, feeds)
            )
            torch_ms = torch_fp16_ms(torch_model, feeds, args.warmup, args.iters)
            row = {
                "model": name,
                "batch": batch,
                "seq": seq,
                "plain_ms": timed["plain export"][0],
                "txcompile_ms": timed["txcompile"][0],
                "speedup": timed["plain export"][0] / timed["txcompile"][0],
                "max_error_vs_fp32": error,
                "torch_fp16_ms": torch_ms,
            }
            if "txcompile padded" in timed:
                row["txcompile_padded_ms"] = timed["txcompile padded"][0]
            if "txcompile gqa" in timed:
                row["txcompile_gqa_ms"] = timed["txcompile gqa"][0]
                gqa_out = timed["txcompile gqa"][1][0].astype(np.float64)
                row["gqa_max_error_vs_fp32"] = float(np.abs(gqa_out - reference).max())
            rows.append(row)
            torch_text = f", torch fp16 {torch_ms:.2f} ms" if torch_ms else ""
            print(
                f"{name} {batch}x{seq}: plain {row['plain_ms']:.2f} ms, "
                f"txcompile {row['txcompile_ms']:.2f} ms "
                f"({row['speedup']:.2f}×){torch_text}; max error vs fp32 {error:.3g}"
            )
            if "txcompile_padded_ms" in row:
                print(f"  without remove-padding: {row['txcompile_padded_ms']:.2f} ms")
            if "txcompile_gqa_ms" in row:
                print(
                    f"  with --attention-op gqa: {row['txcompile_gqa_ms']:.2f} ms, "
                    f"max error vs fp32 {row['gqa_max_error_vs_fp32']:.3g}"
                )
    if args.json:
        Path(args.json).write_text(json.dumps({"onnxruntime": ort.__version__, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
