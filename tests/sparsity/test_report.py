"""sparsity-report: each weight's sparsity and the block shape its zeros come in."""

from __future__ import annotations

import numpy as np

from tests.sparsity import graphs
from txcompile.pass_manager import UNCHANGED
from txcompile.passes.sparsity import SparsityReport


def _report(weight):
    (record,), _ = graphs.apply([SparsityReport], graphs.linear(weight), graphs.feeds(weight.shape[0]))
    assert record.status == UNCHANGED
    return record


def test_block_sparse_weight_reports_its_block():
    record = _report(graphs.block_sparse(128, 256, 1, 32, 0.9))
    (layer,) = record.details["layers"]
    assert layer["sparsity"] == round(1 - 13 / 128, 4) and layer["best_block"] == "1x32"
    assert layer["column_group_density_bn32"] == round(13 / 128, 4)  # 13 live rows per group
    assert record.rule_counts == {"sparse-weights": 1}


def test_transposed_blocks_are_told_apart():
    layer = _report(graphs.block_sparse(128, 256, 32, 1, 0.75)).details["layers"][0]
    assert layer["best_block"] == "32x1"
    assert layer["block_sparsity"]["1x32"] < 0.1


def test_irregular_zeros_need_1x1():
    rng = np.random.default_rng(0)
    weight = rng.standard_normal((64, 64)).astype(np.float32)
    weight[rng.random(weight.shape) < 0.8] = 0
    layer = _report(weight).details["layers"][0]
    assert layer["best_block"] == "1x1" and layer["column_group_density_bn32"] > 0.9


def test_dense_weight():
    record = _report(np.ones((32, 32), np.float32))
    assert record.details["sparse_linears"] == 0 and record.rule_counts == {}
    assert record.details["layers"][0]["best_block"] is None
