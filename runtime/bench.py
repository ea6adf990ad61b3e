"""Side-by-side latency: same inputs, same session options, runs interleaved so drift hits all."""

from __future__ import annotations

import dataclasses
import os
import statistics
import time
from collections.abc import Sequence

import numpy as np
import onnxruntime as ort

from txcompile.runtime import session as rt


@dataclasses.dataclass
class Timing:
    model: str
    dims: dict[str, int]
    median_ms: float
    p90_ms: float
    speedup: float  # median of the first model / this model's median


def _percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q))


def bench(
    sessions: Sequence[tuple[str, ort.InferenceSession]],
    feeds: dict[str, np.ndarray],
    dims: dict[str, int],
    *,
    warmup: int = 3,
    iters: int = 20,
    min_seconds: float = 0.0,
) -> list[Timing]:
    """Time every session on the same feeds; round r runs each model once, in turn."""
    for _, session in sessions:
        for _ in range(warmup):
            rt.run(session, feeds)
    samples: list[list[float]] = [[] for _ in sessions]
    started = time.perf_counter()
    rounds = 0
    while rounds < iters or time.perf_counter() - started < min_seconds:
        for index, (_, session) in enumerate(sessions):
            begin = time.perf_counter()
            rt.run(session, feeds)
            samples[index].append((time.perf_counter() - begin) * 1000)
        rounds += 1
    base = statistics.median(samples[0])
    return [
        Timing(name, dict(dims), statistics.median(s), _percentile(s, 90), base / statistics.median(s))
        for (name, _), s in zip(sessions, samples, strict=True)
    ]


def default_threads() -> int:
    return os.cpu_count() or 1
