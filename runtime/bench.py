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

from txcompile.graph import ort as rt

# Runs timed per block; each block starts with untimed runs (see interleaved_runs).
PER_BLOCK = 5
SETTLE = 1
SETTLE_MS = 10.0  # ... and lasts at least this long


@dataclasses.dataclass
class Timing:
    model: str
    dims: dict[str, int]
    median_ms: float
    p90_ms: float
    speedup: float  # median of the first model / this model's median
    paired_speedup: float  # median over rounds of (first model's block / this model's block)
    paired_range: tuple[float, float]  # 10th and 90th percentile of those per-round ratios
    samples: list[float]  # ms per timed run, in blocks of per_block
    per_block: int


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
    settle_ms: float = SETTLE_MS,
) -> list[list[float]]:
    """Milliseconds of each timed run, per session: blocks of ``per_block`` runs, sessions taking
    turns block by block until each has ``iters`` timed runs.

    Runs right after another session ran are slow — the other one's worker threads still spin
    on the cores for a few milliseconds and the caches hold its data (BERT-base here: 177 ms
    against 151 ms steady; a 90 %-pruned FFN at 16 tokens ran 0.105 ms for its first 33 runs,
    about 3.5 ms, then 0.067 ms) — so each block starts with untimed runs: at least ``settle``
    of them and at least ``settle_ms`` long. Timing every run back to back across sessions
    would measure that switch, not the model."""
    for session in sessions:
        for _ in range(warmup):
            rt.run(session, feeds)
    samples: list[list[float]] = [[] for _ in sessions]
    for done in range(0, iters, per_block):
        for index, session in enumerate(sessions):
            _settle(session, feeds, settle, settle_ms)
            for _ in range(min(per_block, iters - done)):
                begin = time.perf_counter()
                rt.run(session, feeds)
                samples[index].append((time.perf_counter() - begin) * 1000)
    return samples


def _settle(session: ort.InferenceSession, feeds: Mapping[str, np.ndarray], runs: int, ms: float) -> None:
    begin, done = time.perf_counter(), 0
    while done < runs or (time.perf_counter() - begin) * 1000 < ms:
        rt.run(session, feeds)
        done += 1


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
    per_block: int = PER_BLOCK,
) -> list[Timing]:
    """Median and p90 latency of every session on the same feeds (see :func:`interleaved_runs`),
    and its speedup over the first: the ratio of medians, and the median of per-round ratios —
    each round's blocks ran seconds apart, so the machine's slower drift cancels in them."""
    samples = interleaved_runs(
        [s for _, s in sessions], feeds, iters=iters, warmup=warmup, per_block=per_block
    )
    base = statistics.median(samples[0])
    timings = []
    for (name, _), s in zip(sessions, samples, strict=True):
        middle, low, high = _paired(samples[0], s, per_block)
        timings.append(
            Timing(
                name,
                dict(dims),
                statistics.median(s),
                _percentile(s, 90),
                base / statistics.median(s),
                middle,
                (low, high),
                s,
                per_block,
            )
        )
    return timings


def paired_speedup(base: Timing, other: Timing) -> tuple[float, float, float]:
    """How much faster ``other`` ran than ``base`` in the same bench: the median, 10th and 90th
    percentile over rounds of the ratio of their block medians."""
    return _paired(base.samples, other.samples, base.per_block)


def _paired(base: list[float], other: list[float], per_block: int) -> tuple[float, float, float]:
    def blocks(samples):
        return [statistics.median(samples[i : i + per_block]) for i in range(0, len(samples), per_block)]

    ratios = [a / b for a, b in zip(blocks(base), blocks(other), strict=True)]
    return statistics.median(ratios), _percentile(ratios, 10), _percentile(ratios, 90)


def default_threads() -> int:
    return os.cpu_count() or 1
