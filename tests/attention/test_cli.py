"""--attention-op, --strict and the coverage section of `txcompile inspect`."""

from __future__ import annotations

import onnx
import pytest

from txcompile.cli import main
from txcompile.graph.inputs import InputSpec, write_specs

from .graphs import HIDDEN, attention_block


def _save(tmp_path, **kwargs) -> str:
    model = attention_block(**kwargs)
    write_specs(
        model,
        [
            InputSpec("x", "float32", ("batch", "seq", HIDDEN), "normal"),
            InputSpec("attention_mask", "int64", ("batch", "seq"), "mask"),
        ],
    )
    path = tmp_path / "attention.onnx"
    onnx.save(model, path)
    return str(path)


def test_strict_passes_when_every_site_fuses(tmp_path, capsys):
    source = _save(tmp_path)
    out = tmp_path / "out.onnx"
    assert main(["optimize", source, "-o", str(out), "--passes", "fuse-attention", "--strict"]) == 0
    assert "attention coverage" in capsys.readouterr().out
    assert "Attention" in [n.op_type for n in onnx.load(out).graph.node]


def test_strict_fails_on_an_unfused_site(tmp_path, capsys):
    source = _save(tmp_path, extra_output="probs")
    out = tmp_path / "out.onnx"
    args = ["optimize", source, "-o", str(out), "--passes", "fuse-attention"]
    assert main(args) == 0
    assert main([*args, "--strict"]) == 1
    assert "attention site(s) unfused" in capsys.readouterr().err
    capsys.readouterr()
    assert main(["inspect", str(out)]) == 0
    shown = capsys.readouterr().out
    assert "attention coverage" in shown and "unfused" in shown and "graph output" in shown


def test_onnx_attention_from_the_cli(tmp_path):
    out = tmp_path / "out.onnx"
    args = [
        "optimize",
        _save(tmp_path),
        "-o",
        str(out),
        "--passes",
        "fuse-attention",
        "--attention-op",
        "onnx",
    ]
    assert main(args) == 0
    assert "Attention" in [n.op_type for n in onnx.load(out).graph.node]


def test_unknown_attention_op_exits_2(tmp_path):
    with pytest.raises(SystemExit) as exit_info:
        main(["optimize", _save(tmp_path), "-o", str(tmp_path / "o.onnx"), "--attention-op", "flash"])
    assert exit_info.value.code == 2
