"""The sparsity flags end to end on a real export (tiny-bert): prune, rewrite, report, bad input."""

from __future__ import annotations

import json

import onnx
import pytest

from tests.core.test_cli import _bad, tx


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory):
    from txcompile.exporters import export_onnx, load_model_spec

    path = tmp_path_factory.mktemp("bert") / "tiny-bert.onnx"
    onnx.save(export_onnx(load_model_spec("tiny-bert"), dims={"batch": 2, "seq": 16}).model, path)
    return path


def _passes(report_path) -> dict:
    report = json.loads(report_path.read_text())
    return {record["name"]: record for record in report["passes"]}, report


def test_sparsity_inserts_prune_and_sparse_matmul(tiny_bert, tmp_path):
    out = tmp_path / "sparse.onnx"
    # the cost model decides (a measurement could say dense on a loaded machine)
    result = tx(
        "optimize", tiny_bert, "-o", out, "--sparsity", "0.9", "--block", "1x32", "--balanced",
        "--sparse-decision", "cost",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    passes, report = _passes(tmp_path / "sparse.report.json")
    names = list(passes)
    assert names.index("prune") + 1 == names.index("sparse-matmul") < names.index("analyze")
    assert (
        passes["prune"]["status"] == "applied" and passes["prune"]["details"]["accuracy"]["mean_cosine"] < 1
    )
    rewrite = passes["sparse-matmul"]
    assert rewrite["status"] == "applied" and rewrite["max_diff"] <= 1e-4
    assert rewrite["details"]["rewritten"] >= 1 and rewrite["details"]["params_saved"] > 0
    for layer in rewrite["details"]["layers"]:
        assert layer["pattern"] != "dense" or layer["reason"]
    assert report["verification"]["exact"] is False  # pruning is approximate


def test_without_sparsity_existing_sparsity_only(tiny_bert, tmp_path):
    out = tmp_path / "plain.onnx"
    result = tx("optimize", tiny_bert, "-o", out)
    assert result.returncode == 0, result.stderr
    passes, _ = _passes(tmp_path / "plain.report.json")
    assert "prune" not in passes and passes["sparse-matmul"]["status"] == "unchanged"


def test_int8_sparse(tiny_bert, tmp_path):
    out = tmp_path / "int8.onnx"
    result = tx(
        "optimize", tiny_bert, "-o", out, "--sparsity", "0.9", "--balanced",
        "--precision", "int8", "--sparse-decision", "always", "--passes", "sparse-matmul",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    passes, _ = _passes(tmp_path / "int8.report.json")
    rewrite = passes["sparse-matmul"]
    assert rewrite["exact"] is False and "column-groups-int8" in rewrite["rule_counts"]


@pytest.mark.parametrize(
    "flags,words",
    [
        (["--sparsity", "1.5"], "between 0 and 1"),
        (["--sparsity", "0.5", "--block", "3y4"], "--block"),
        (["--sparsity", "0.5", "--prune-score", "random"], "invalid choice"),
    ],
)
def test_bad_flags_exit_2(tiny_bert, tmp_path, flags, words):
    result = tx("optimize", tiny_bert, "-o", tmp_path / "x.onnx", *flags)
    assert result.returncode == 2
    assert words in result.stderr


def test_activation_score_without_calibration_file_uses_verification_inputs(tiny_bert, tmp_path):
    out = tmp_path / "act.onnx"
    result = tx(
        "optimize", tiny_bert, "-o", out, "--sparsity", "0.5", "--block", "1x1", "--prune-score", "activation"
    )
    assert result.returncode == 0, result.stderr
    passes, _ = _passes(tmp_path / "act.report.json")
    assert passes["prune"]["details"]["calibrated_on"] == "the verification inputs"


def test_missing_calibration_file_is_one_line(tiny_bert, tmp_path):
    result = tx(
        "optimize", tiny_bert, "-o", tmp_path / "x.onnx", "--sparsity", "0.5",
        "--prune-score", "activation", "--calib", tmp_path / "none.npz",
    )  # fmt: skip
    _bad(result, 2, "none.npz")
