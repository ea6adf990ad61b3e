"""Side-by-side latency: same inputs, same session options, blocks of runs alternating so drift
hits every model alike."""

from __future__ import annotations

import dataclasses
import os
import statistics
import time
from collections.abc import Mapping, Sequence

import numpy as np
import onnxruntime as ort

from txcompile.runtime import session as rt

# Runs timed per block; each block starts with untimed runs (see interleaved_runs).
PER_BLOCK = 5
SETTLE = 1


@dataclasses.dataclass
class Timing:
    model: str
    dims: dict[str, int]
    median_ms: float
    p90_ms: float
    speedup: float  # median of the first model / this model's median


def _percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q))


def interleaved_runs(
    sessions: Sequence[ort.InferenceSession],
    feeds: Mapping[str, np.ndarray],
    *,
    iters: int = 20,
    per_block: int = PER_BLOCK,
    settle: int = SETTLE,
    warmup: int = 3,
) -> list[list[float]]:
    """Milliseconds of each timed run, per session: blocks of ``per_block`` runs, sessions taking
    turns block by block until each has ``iters`` timed runs.

    A session's first run after another session ran is slow — the other one's worker threads
    still spin on the cores and the caches hold its data (BERT-base here: 177 ms against 151
    ms steady, its int8 graph 85 against 52) — so each block starts with ``settle`` untimed runs.
    Timing every run back to back across sessions would measure that switch, not the model."""
    for session in sessions:
        for _ in range(warmup):
            rt.run(session, feeds)
    samples: list[list[float]] = [[] for _ in sessions]
    for done in range(0, iters, per_block):
        for index, session in enumerate(sessions):
            for _ in range(settle):
                rt.run(session, feeds)
            for _ in range(min(per_block, iters - done)):
                begin = time.perf_counter()
                rt.run(session, feeds)
                samples[index].append((time.perf_counter() - begin) * 1000)
    return samples


def medians(sessions: Sequence[ort.InferenceSession], feeds: Mapping[str, np.ndarray], **how) -> list[float]:
    """Median milliseconds per run of each session (``how``: see :func:`interleaved_runs`)."""
    return [statistics.median(s) for s in interleaved_runs(sessions, feeds, **how)]


def bench(
    sessions: Sequence[tuple[str, ort.InferenceSession]],
    feeds: dict[str, np.ndarray],
    dims: dict[str, int],
    *,
    warmup: int = 3,
    iters: int = 20,
) -> list[Timing]:
    """Median and p90 latency of every session on the same feeds (see :func:`interleaved_runs`)."""
    samples = interleaved_runs([s for _, s in sessions], feeds, iters=iters, warmup=warmup)
    base = statistics.median(samples[0])
    return [
        Timing(name, dict(dims), statistics.median(s), _percentile(s, 90), base / statistics.median(s))
        for (name, _), s in zip(sessions, samples, strict=True)
    ]


def default_threads() -> int:
    return os.cpu_count() or 1
