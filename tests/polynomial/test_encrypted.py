"""Encrypted (CKKS, TenSEAL) runs of polynomial blocks, compared with ORT on the same graph."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest

from txcompile import compiler
from txcompile.cli import main
from txcompile.exporters import export_onnx, load_model_spec
from txcompile.graph.errors import TxError
from txcompile.graph.inputs import make_feeds, read_specs

pytest.importorskip("tenseal")
from txcompile.runtime.he import run_encrypted  # noqa: E402

BLOCKS = Path(__file__).with_name("blocks.py")


def _polynomial_block(factory: str, **options) -> onnx.ModelProto:
    torch_model = load_model_spec(f"{BLOCKS}:{factory}")
    exported = export_onnx(torch_model, dims={"batch": 1, "seq": 2}, dynamic=False)
    settings = compiler.Settings(target="he", flags=options)
    return compiler.optimize(exported.model, settings, source=factory, output="unused.onnx").model


@pytest.fixture(scope="module")
def mlp() -> onnx.ModelProto:
    return _polynomial_block("mlp_block")


def test_mlp_block_decrypts_within_1e2(mlp):
    feeds = make_feeds(read_specs(mlp), {"batch": 1, "seq": 2}, seed=3)
    result = run_encrypted(mlp, feeds)
    assert result.max_diff < 1e-2
    assert result.depth <= 5 and result.parameters["poly_modulus_degree"] <= 16384  # 6 before
    assert result.ciphertexts == 1 * 2 * 4  # one per input element
    assert all(np.abs(value).max() > 1e-3 for value in result.outputs.values())


def test_attention_head_decrypts_within_1e2():
    head = _polynomial_block("attention_head")  # approx: polynomial exp, reciprocal by Newton
    feeds = make_feeds(read_specs(head), {"batch": 1, "seq": 2}, seed=3)
    result = run_encrypted(head, feeds)
    assert result.max_diff < 1e-2 and np.isfinite(result.plaintext["output"]).all()
    assert result.depth <= 9  # 10 before: exp and reciprocal at ⌈log₂(d + 1)⌉, the exp inside Newton
    assert result.parameters["multiplications"]["ct×ct"] > 0  # q·kᵀ and p·v on ciphertexts
    assert np.abs(result.outputs["output"]).max() > 1e-2


def test_power_softmax_attention_head_decrypts_within_1e2():
    head = _polynomial_block("attention_head", he_mode="power-softmax")
    # the calibration inputs (seed 0, the verification inputs): power-softmax's reciprocal is
    # only valid on the calibrated range of mean(x⁴), which other random inputs can leave
    feeds = make_feeds(read_specs(head), {"batch": 1, "seq": 2}, seed=0)
    result = run_encrypted(head, feeds)
    assert result.max_diff < 1e-2 and np.isfinite(result.plaintext["output"]).all()
    assert result.depth <= 13 and result.parameters["poly_modulus_degree"] <= 32768  # 14 before


def test_deeper_than_budget_is_refused_with_both_numbers(mlp):
    feeds = make_feeds(read_specs(mlp), {"batch": 1, "seq": 2}, seed=3)
    with pytest.raises(TxError, match=r"needs \d+ levels; the budget is 2"):
        run_encrypted(mlp, feeds, level_budget=2)


def test_cli_refuses_over_budget_with_exit_2(mlp, tmp_path, capsys):
    path = tmp_path / "mlp.onnx"
    onnx.save(mlp, path)
    assert main(["run", str(path), "--encrypted", "--level-budget", "1", "--batch", "1", "--seq", "2"]) == 2
    assert "budget is 1" in capsys.readouterr().err


def test_non_polynomial_graph_is_refused():
    exported = export_onnx(load_model_spec(f"{BLOCKS}:mlp_block"), dims={"batch": 1, "seq": 2}, dynamic=False)
    with pytest.raises(TxError, match="compile with --target he"):
        run_encrypted(exported.model, make_feeds(read_specs(exported.model), {"batch": 1, "seq": 2}))
