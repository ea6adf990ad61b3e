"""Decode speed with a KV cache: txcompile against onnxruntime-genai's model builder and Optimum.

txcompile compiles with ``--attention-op gqa`` (GroupQueryAttention appending to the cache).
Batch 1, a prompt of 128 random token ids, 128 greedy new tokens, 2 threads, random weights:
a ~120M LLaMA-style config (hidden 768, 12 layers, 12 query / 4 KV heads) and GPT-2 small
(which the builder cannot build). Every candidate generates the same way — prefill, then one
token per step, never stopping early — and the rounds interleave the candidates so the
machine's drift hits them alike. Reported per candidate: prefill ms and decode tokens/s
(medians over the rounds, with the range), and whether its greedy ids equal txcompile fp32's.

Peers run from their own environments, never txcompile's: the builder needs transformers 5
(``--genai-python``, a venv with onnxruntime-genai; the model is built there, then timed in
its own process), Optimum 0.1 needs transformers 4.57 (``--optimum-python``). Each candidate
is timed in a subprocess of one environment, round by round::

    .venv/bin/python tests/benchmarks/decode_generation.py --work /tmp/decode \\
        --genai-python /work/bench-genai/bin/python --optimum-python /work/bench-optimum/bin/python
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

PROMPT, NEW_TOKENS, THREADS = 128, 128, 2
CONFIGS = {
    "llama-120m": {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": 32000,
        "hidden_size": 768,
        "intermediate_size": 2048,
        "num_hidden_layers": 12,
        "num_attention_heads": 12,
        "num_key_value_heads": 4,
        "max_position_embeddings": 2048,
        "rms_norm_eps": 1e-5,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "tie_word_embeddings": False,
    },
    "gpt2-small": {
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "vocab_size": 50257,
        "n_embd": 768,
        "n_layer": 12,
        "n_head": 12,
        "n_positions": 1024,
        "bos_token_id": 50256,
        "eos_token_id": 50256,
    },
}


# ---------------------------------------------------------------------------------------------
# one candidate, timed in the process of its own environment (``--time`` mode)


def _prompt(vocab: int) -> list[int]:
    import numpy as np

    return [int(t) for t in np.random.default_rng(0).integers(3, vocab - 1, PROMPT)]


def time_txcompile(model: str, vocab: int) -> dict:
    from txcompile.runtime import Generator

    generator = Generator(model, threads=THREADS)
    prompt = _prompt(vocab)
    generator.generate([prompt], 4, eos_ids=[])  # warm-up
    result = generator.generate([prompt], NEW_TOKENS, eos_ids=[])
    return {"prefill_ms": result.prefill_ms, "tokens_per_s": result.decode_tokens_per_s, "ids": result.ids[0]}


def time_genai(model: str, vocab: int) -> dict:
    import onnxruntime_genai as og

    loaded = og.Model(model)
    prompt = _prompt(vocab)

    def run(new_tokens: int):
        params = og.GeneratorParams(loaded)
        params.set_search_options(
            max_length=PROMPT + new_tokens, min_length=PROMPT + new_tokens, do_sample=False
        )
        generator = og.Generator(loaded, params)
        start = time.perf_counter()
        generator.append_tokens(prompt)
        prefill = time.perf_counter() - start
        ids, start = [], time.perf_counter()  # the first token comes from the prefill's logits
        while not generator.is_done():
            generator.generate_next_token()
            ids.append(int(generator.get_next_tokens()[0]))
        return prefill, time.perf_counter() - start, ids

    run(4)
    prefill, decode, ids = run(NEW_TOKENS)
    steps = len(ids) - 1
    return {"prefill_ms": 1000 * prefill, "tokens_per_s": steps / decode, "ids": ids[:NEW_TOKENS]}


def time_hf_generate(model: str, vocab: int, kind: str) -> dict:
    """Optimum's ORTModelForCausalLM or torch eager, through transformers' generate: decode
    tokens/s from the time of 128 new tokens less the time of one (the prefill)."""
    import torch

    torch.set_num_threads(THREADS)
    if kind == "optimum":
        import onnxruntime as ort
        from optimum.onnxruntime import ORTModelForCausalLM

        options = ort.SessionOptions()
        options.intra_op_num_threads, options.inter_op_num_threads = THREADS, 1
        loaded = ORTModelForCausalLM.from_pretrained(model, session_options=options, use_cache=True)
    else:
        from transformers import AutoModelForCausalLM

        loaded = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32).eval()
    ids = torch.tensor([_prompt(vocab)])
    mask = torch.ones_like(ids)

    def run(new_tokens: int):
        start = time.perf_counter()
        with torch.no_grad():
            out = loaded.generate(
                input_ids=ids,
                attention_mask=mask,
                max_new_tokens=new_tokens,
                min_new_tokens=new_tokens,
                do_sample=False,
                pad_token_id=0,
            )
        return time.perf_counter() - start, out[0, PROMPT:].tolist()

    run(4)
    first, _ = run(1)
    total, new = run(NEW_TOKENS)
    return {"prefill_ms": 1000 * first, "tokens_per_s": (NEW_TOKENS - 1) / (total - first), "ids": new}


TIMERS = {
    "txcompile": time_txcompile,
    "genai": time_genai,
    "optimum": lambda m, v: time_hf_generate(m, v, "optimum"),
    "torch": lambda m, v: time_hf_generate(m, v, "torch"),
}


# ---------------------------------------------------------------------------------------------
# building every candidate's model once, then the interleaved rounds


def write_folder(root: Path, name: str) -> Path:
    """The config with random weights (seed 0) and an offline WordLevel tokenizer."""
    import torch
    import transformers
    from tokenizers import Tokenizer, models

    folder = root / name
    if (folder / "model.safetensors").is_file():
        return folder
    config = transformers.AutoConfig.for_model(**CONFIGS[name])
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config)
    model.save_pretrained(folder)
    vocab = {f"t{i}": i for i in range(config.vocab_size)}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="t0"))
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="t0", eos_token="t2")
    fast.save_pretrained(folder)
    return folder


def build(args, root: Path, name: str) -> dict[str, tuple[str, str]]:
    """candidate → (python, model path) for one config."""
    folder = write_folder(root, name)
    tx = sys.executable
    candidates = {}
    for precision in ("fp32", "int8", "int4"):
        out = root / f"{name}-txcompile-{precision}.onnx"
        if not out.is_file():
            flags = ["--attention-op", "gqa"] + ([] if precision == "fp32" else ["--precision", precision])
            _check([tx, "-m", "txcompile", "compile", str(folder), "-o", str(out), *flags], "txcompile")
        candidates[f"txcompile {precision}"] = (tx, str(out))
    if args.genai_python and name != "gpt2-small":  # the builder has no GPT-2
        for precision in ("fp32", "int4"):
            out = root / f"{name}-genai-{precision}"
            if not (out / "genai_config.json").is_file():
                builder = [args.genai_python, "-m", "onnxruntime_genai.models.builder"]
                _check([*builder, "-i", str(folder), "-o", str(out), "-p", precision, "-e", "cpu"], "builder")
                _set_genai_threads(out / "genai_config.json")
            candidates[f"genai {precision}"] = (args.genai_python, str(out))
    if args.optimum_python:
        out = root / f"{name}-optimum"
        if not (out / "model.onnx").is_file():
            export = "from optimum.exporters.onnx import main_export; import sys; "
            export += "main_export(sys.argv[1], sys.argv[2], task='text-generation-with-past')"
            _check([args.optimum_python, "-c", export, str(folder), str(out)], "optimum export")
            for extra in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
                if (folder / extra).is_file() and not (out / extra).is_file():
                    (out / extra).write_bytes((folder / extra).read_bytes())
        candidates["optimum fp32"] = (args.optimum_python, str(out))
    if args.torch:
        candidates["torch eager"] = (args.optimum_python or tx, str(folder))
    return candidates


def _set_genai_threads(path: Path) -> None:
    config = json.loads(path.read_text())
    options = config["model"]["decoder"].setdefault("session_options", {})
    options.update({"intra_op_num_threads": THREADS, "inter_op_num_threads": 1})
    path.write_text(json.dumps(config, indent=2))


def _check(command: list[str], what: str) -> None:
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"{what} failed: {_last_line(done)}")
    print(f"  built with {what} in {time.perf_counter() - start:.0f} s", flush=True)


def time_once(python: str, candidate: str, model: str, vocab: int) -> dict:
    kind = candidate.split()[0]
    command = [python, __file__, "--time", kind, model, str(vocab)]
    env = {**os.environ, "OMP_NUM_THREADS": str(THREADS)}
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        return {"error": _last_line(done)}
    return json.loads(done.stdout.strip().splitlines()[-1])


def _last_line(done: subprocess.CompletedProcess) -> str:
    lines = done.stderr.strip().splitlines()
    return lines[-1] if lines else f"exit {done.returncode}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--time", nargs=3, metavar=("KIND", "MODEL", "VOCAB"), help=argparse.SUPPRESS)
    parser.add_argument("--work", default="/tmp/txcompile-decode", help="models are built (once) here")
    parser.add_argument("--genai-python", help="python of an environment with onnxruntime-genai")
    parser.add_argument("--optimum-python", help="python of an environment with optimum-onnx")
    parser.add_argument("--torch", action="store_true", help="also time torch eager (transformers generate)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--configs", default=",".join(CONFIGS))
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()
    if args.time:
        kind, model, vocab = args.time
        print(json.dumps(TIMERS[kind](model, int(vocab))))
        return
    root = Path(args.work)
    root.mkdir(parents=True, exist_ok=True)
    results = {}
    for name in args.configs.split(","):
        print(f"{name}: building", flush=True)
        candidates = build(args, root, name)
        vocab = CONFIGS[name]["vocab_size"]
        runs: dict[str, list[dict]] = {c: [] for c in candidates}
        for round_index in range(args.rounds):
            for candidate, (python, model) in candidates.items():
                runs[candidate].append(time_once(python, candidate, model, vocab))
            print(f"  round {round_index + 1}/{args.rounds} done", flush=True)
        results[name] = _summary(runs)
        _print(name, results[name])
        ratios = _ratios(runs)
        for pair, (median, low, high) in ratios.items():
            print(f"  {pair}: {median:.3f}x ({low:.3f}–{high:.3f}) decode tok/s, per round")
        results[name]["ratios"] = {pair: list(values) for pair, values in ratios.items()}
    if args.json:
        Path(args.json).write_text(
            json.dumps({"cpu": _cpu(), "threads": THREADS, "results": results}, indent=2)
        )


def _summary(runs: dict[str, list[dict]]) -> dict:
    reference = next(
        (r[0].get("ids") for c, r in runs.items() if c == "txcompile fp32" and "ids" in r[0]), None
    )
    summary = {}
    for candidate, measured in runs.items():
        good = [m for m in measured if "error" not in m]
        if not good:
            summary[candidate] = {"error": measured[0]["error"]}
            continue
        speeds = [m["tokens_per_s"] for m in good]
        summary[candidate] = {
            "tokens_per_s": statistics.median(speeds),
            "range": [min(speeds), max(speeds)],
            "prefill_ms": statistics.median(m["prefill_ms"] for m in good),
            "same_ids": good[0]["ids"] == reference if reference is not None else None,
        }
    return summary


# the comparisons the targets name: txcompile first, the peer it has to match or beat second
RATIOS = (
    ("txcompile fp32", "genai fp32"),
    ("txcompile int4", "genai int4"),
    ("txcompile fp32", "optimum fp32"),
)


def _ratios(runs: dict[str, list[dict]]) -> dict[str, tuple[float, float, float]]:
    """(median, low, high) of each round's ratio: the candidates of one round ran back to back,
    so the machine's drift cancels out of their ratio better than out of the medians."""
    ratios = {}
    for ours, theirs in RATIOS:
        pairs = zip(runs.get(ours, []), runs.get(theirs, []), strict=False)
        values = [
            a["tokens_per_s"] / b["tokens_per_s"] for a, b in pairs if "error" not in a and "error" not in b
        ]
        if values:
            ratios[f"{ours} / {theirs}"] = (statistics.median(values), min(values), max(values))
    return ratios


def _print(name: str, summary: dict) -> None:
    print(f"\n{name}: batch 1, prompt {PROMPT}, {NEW_TOKENS} new tokens, {THREADS} threads ({_cpu()})")
    print(f"{'candidate':<18} {'decode tok/s':>13} {'range':>15} {'prefill ms':>11}  ids = txcompile fp32")
    for candidate, row in summary.items():
        if "error" in row:
            print(f"{candidate:<18} error: {row['error'][:90]}")
            continue
        low, high = row["range"]
        print(
            f"{candidate:<18} {row['tokens_per_s']:>13.1f} {f'{low:.1f}–{high:.1f}':>15} "
            f"{row['prefill_ms']:>11.1f}  {row['same_ids']}"
        )


def _cpu() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown CPU"


if __name__ == "__main__":
    main()
