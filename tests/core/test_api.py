"""The Python API on an ONNX model: optimize, save, load and call, and its errors."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

import txcompile
from txcompile.graph.errors import TxError


def test_optimize_save_load_and_call(mlp_file, tmp_path):
    result = txcompile.optimize(mlp_file)
    assert result.passed is True and isinstance(result.model, onnx.ModelProto)
    saved = result.save(tmp_path / "out.onnx")
    assert (tmp_path / "out.report.json").is_file() and result.report["output"] == str(saved)
    model = txcompile.load(saved)
    x = np.ones((2, 8), np.float32)
    expected = txcompile.load(mlp_file)(x=x)
    np.testing.assert_allclose(model(x=x)["y"], expected["y"], atol=1e-5)
    assert not model.has_tokenizer and model.task is None
    with pytest.raises(TxError, match="saved without a tokenizer"):
        model(["some text"])


def test_save_never_replaces_what_the_result_was_made_from(mlp_file):
    result = txcompile.optimize(mlp_file)
    before = open(mlp_file, "rb").read()
    with pytest.raises(TxError, match="equals the input"):
        result.save(mlp_file)
    assert open(mlp_file, "rb").read() == before


def test_unknown_options_and_bad_values_are_tx_errors(mlp_file, mlp):
    with pytest.raises(TxError, match="unknown option 'sparsty'"):
        txcompile.optimize(mlp_file, sparsty=0.9)
    with pytest.raises(TxError, match="not a tolerance"):
        txcompile.optimize(mlp, atol=-1)
    with pytest.raises(TxError, match="unknown pass"):
        txcompile.optimize(mlp, passes=["no-such-pass"])
