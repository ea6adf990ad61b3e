"""runtime.bench: sessions take turns in blocks, each block after untimed settling runs."""

from __future__ import annotations

import time

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from txcompile.graph import ort as rt
from txcompile.runtime import bench


def _identity_session():
    graph = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9
    return rt.create_session(onnx.ModelProto.FromString(model.SerializeToString()))


class Recording:
    """A real session that notes, in one shared log, which session ran."""

    def __init__(self, name: str, log: list[str]) -> None:
        self.name, self.log, self.session = name, log, _identity_session()

    def get_inputs(self):
        return self.session.get_inputs()

    def get_outputs(self):
        return self.session.get_outputs()

    def run(self, names, feeds):
        self.log.append(self.name)
        return self.session.run(names, feeds)


def test_blocks_alternate_with_settling_runs_and_every_session_gets_iters_samples():
    log: list[str] = []
    sessions = [Recording("a", log), Recording("b", log)]
    feeds = {"x": np.ones(2, np.float32)}
    samples = bench.interleaved_runs(sessions, feeds, iters=7, per_block=3, settle=1, warmup=2, settle_ms=0)
    assert [len(s) for s in samples] == [7, 7] and all(t > 0 for s in samples for t in s)
    # warm-up, then blocks of 1 settling + 3 timed runs (the last block only 1 timed)
    expected = ["a"] * 2 + ["b"] * 2
    for timed in (3, 3, 1):
        expected += ["a"] * (1 + timed) + ["b"] * (1 + timed)
    assert log == expected


def test_settling_lasts_at_least_settle_ms():
    log: list[str] = []
    sessions = [Recording("a", log), Recording("b", log)]
    begin = time.perf_counter()
    feeds = {"x": np.ones(2, np.float32)}
    bench.interleaved_runs(sessions, feeds, iters=2, per_block=2, warmup=0, settle_ms=20)
    assert time.perf_counter() - begin >= 0.040  # two blocks, each settled for 20 ms
    # a run of the identity model takes well under a millisecond: many settling runs per block
    assert log.count("a") > 10 and log.count("b") > 10 and log[-2:] == ["b", "b"]


def test_bench_reports_speedup_against_the_first_model():
    sessions = [("a", _identity_session()), ("b", _identity_session())]
    timings = bench.bench(sessions, {"x": np.ones(2, np.float32)}, {"batch": 1}, iters=6, per_block=2)
    assert [t.model for t in timings] == ["a", "b"] and timings[0].speedup == 1.0
    assert timings[0].paired_speedup == 1.0 and timings[0].paired_range == (1.0, 1.0)
    assert all(t.p90_ms >= t.median_ms > 0 and len(t.samples) == 6 for t in timings)


def test_paired_speedup_is_the_median_of_per_round_block_ratios():
    def timing(samples):
        return bench.Timing("m", {}, 0.0, 0.0, 1.0, 1.0, (1.0, 1.0), samples, 2)

    # three rounds of two runs: base blocks 10, 20, 40 ms; other 5, 10, 40 → ratios 2, 2, 1
    base, other = timing([10, 10, 20, 20, 40, 40]), timing([5, 5, 10, 10, 40, 40])
    middle, low, high = bench.paired_speedup(base, other)
    assert middle == 2.0 and low == pytest.approx(1.2) and high == 2.0
