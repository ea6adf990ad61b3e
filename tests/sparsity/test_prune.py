"""prune: block selection by score, balance, roles, and an accuracy report that is computed."""

from __future__ import annotations

import numpy as np
import pytest

from tests.sparsity import graphs
from txcompile.graph.errors import TxError
from txcompile.pass_manager import APPLIED, UNCHANGED
from txcompile.passes.base import PassContext
from txcompile.passes.sparsity import Prune, SparseMatMul, prune


def _dense(k=64, n=128, seed=0):
    return (np.random.default_rng(seed).standard_normal((k, n)) / np.sqrt(k)).astype(np.float32)


def _prune(model, feeds, **options):
    (record,), result = graphs.apply([Prune], model, feeds, **options)
    return record, result


def test_balanced_1x32_blocks_reach_the_target_in_every_group():
    model, feeds = graphs.linear(_dense()), graphs.feeds(64)
    record, result = _prune(model, feeds, sparsity=0.75, block="1x32", balanced=True)
    assert record.status == APPLIED and not record.exact
    weight = graphs.initializer(result, "w")
    assert (weight == 0).mean() == pytest.approx(0.75)
    live_rows = (weight != 0).reshape(64, 4, 32).any(axis=2).sum(axis=0)
    assert list(live_rows) == [16] * 4  # same rows count in each column group
    blocks = (weight != 0).reshape(64, 4, 32)
    assert np.all(blocks.all(axis=2) | ~blocks.any(axis=2))  # whole 1x32 blocks only
    assert record.details["layers"][0]["sparsity_after"] == 0.75


def test_magnitude_keeps_the_largest_blocks():
    weight = _dense()
    weight[7] *= 100  # one input row with huge weights must survive
    record, result = _prune(graphs.linear(weight), graphs.feeds(64), sparsity=0.9, block="1x32")
    assert (graphs.initializer(result, "w")[7] != 0).all()


def test_activation_score_follows_the_inputs():
    """Same weights, but feature 3 is 1000x larger at the input: activation-aware keeps row 3."""
    weight = _dense()
    feeds = graphs.feeds(64)
    feeds["x"][..., 3] *= 1000
    scores = {}
    for score in ("magnitude", "activation"):
        record, result = _prune(graphs.linear(weight), feeds, sparsity=0.9, block="1x32", prune_score=score)
        scores[score] = (graphs.initializer(result, "w")[3] != 0).all()
    assert scores == {"magnitude": False, "activation": True}
    assert record.details["calibrated_on"] == "the verification inputs"


def test_calibration_file(tmp_path):
    feeds = graphs.feeds(64)
    calib = tmp_path / "calib.npz"
    np.savez(calib, x=feeds["x"] * 2)
    record, _ = _prune(
        graphs.linear(_dense()), feeds, sparsity=0.5, block="1x1", prune_score="activation", calib=str(calib)
    )
    assert record.status == APPLIED and record.details["calibrated_on"] == str(calib)


def test_final_projection_is_skipped_unless_asked():
    model, feeds = graphs.linear(_dense(), relu=False), graphs.feeds(64)  # Identity -> graph output
    record, _ = _prune(model, feeds, sparsity=0.9, block="1x32")
    assert record.status == UNCHANGED
    assert "final projection" in record.details["layers"][0]["skipped"]
    record, _ = _prune(model, feeds, sparsity=0.9, block="1x32", prune_final=True)
    assert record.status == APPLIED


def test_accuracy_report_is_computed_from_the_outputs():
    model, feeds = graphs.linear(_dense()), graphs.feeds(64)
    record, result = _prune(model, feeds, sparsity=0.5, block="1x32")
    accuracy = record.details["accuracy"]
    before, after = graphs.run(model, feeds)[0], graphs.run(result, feeds)[0]
    assert accuracy["max_abs_diff"] == pytest.approx(float(np.abs(before - after).max()), rel=1e-5)
    rows_a, rows_b = before.reshape(-1, 128).astype(np.float64), after.reshape(-1, 128).astype(np.float64)
    expected = np.mean(prune.cosine_rows(rows_a, rows_b))
    assert accuracy["mean_cosine"] == pytest.approx(expected) and accuracy["mean_cosine"] < 1.0
    assert record.max_diff == pytest.approx(accuracy["max_abs_diff"], rel=1e-5)


def test_neurons_then_sparse_matmul_shrink_the_ffn():
    rng = np.random.default_rng(0)
    up, down = _dense(32, 128), _dense(128, 32, seed=1)
    bias = rng.standard_normal(128).astype(np.float32)
    model, feeds = graphs.ffn(up, down, bias), graphs.feeds(32)
    records, result = graphs.apply([Prune, SparseMatMul], model, feeds, sparsity=0.75, block="neuron")
    pruned, rewritten = records
    assert pruned.status == APPLIED and pruned.rule_counts == {"neurons": 1}
    assert rewritten.status == APPLIED and rewritten.max_diff <= 1e-4
    assert rewritten.details["layers"][0]["pattern"] == "structured: 128 -> 32 channels"


def test_tiles_that_do_not_fit_are_reported():
    record, _ = _prune(graphs.linear(_dense(60, 100)), graphs.feeds(60), sparsity=0.9, block="1x32")
    assert record.status == UNCHANGED
    assert record.details["layers"][0]["skipped"] == "block 1x32 does not tile [60, 100]"


def test_missing_target_is_bad_input():
    with pytest.raises(TxError, match="needs a target"):
        _prune(graphs.linear(_dense()), graphs.feeds(64))


@pytest.mark.parametrize(
    "options",
    [{"block": "3y4"}, {"prune_score": "random"}, {"sparsity": 1.5}, {"calib": "/nonexistent/calib.npz"}],
)
def test_bad_options_are_refused_before_running(options):
    with pytest.raises(TxError):
        Prune(PassContext(flags={"sparsity": 0.5, **options}))


def test_select_per_column_and_global():
    scores = np.array([[1.0, 9.0], [2.0, 8.0], [3.0, 7.0], [4.0, 6.0]])
    assert prune.select(scores, 0.5, balanced=True).sum(axis=0).tolist() == [2, 2]
    assert prune.select(scores, 0.5, balanced=False)[:, 1].all()
