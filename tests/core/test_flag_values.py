"""Flag values that cannot mean anything are refused by argparse (exit 2, usage and one error
line), before any file is read or written."""

from __future__ import annotations

import pytest

from tests.core.test_cli import tx


@pytest.mark.parametrize(
    ("command", "flags", "words"),
    [
        ("optimize", ["--atol", "-1"], "negative"),
        ("optimize", ["--atol", "nan"], "not a finite number"),
        ("optimize", ["--atol", "inf"], "not a finite number"),
        ("run", ["--atol", "-0.5"], "negative"),
        ("optimize", ["--passes", ""], "names no pass"),
        ("optimize", ["--passes", " , "], "names no pass"),
        ("optimize", ["--disable-pass", ","], "names no pass"),
        ("optimize", ["--he-tol", "0"], "must be above 0"),
        ("optimize", ["--he-margin=-inf"], "not a finite number"),
        ("export", ["--opset", "5"], "opset 5 is outside 7"),
        ("export", ["--opset", "99"], "opset 99 is outside 7"),
    ],
)
def test_meaningless_flag_values_are_refused(tmp_path, mlp_file, command, flags, words):
    target = mlp_file if command != "export" else "tiny-bert"
    out = tmp_path / "out.onnx"
    extra = [] if command == "run" else ["-o", out]
    result = tx(command, target, *extra, *flags)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert lines[0].startswith("usage:") and "Traceback" not in result.stderr
    assert words in lines[-1], lines[-1]
    assert not out.exists()


def test_an_opset_the_exporter_cannot_write_is_said(tmp_path):
    """torch's dynamo exporter converts down to 17 but not to 14: asking for 14 gets a warning."""
    out = tmp_path / "m.onnx"
    result = tx("export", "tiny-bert", "-o", out, "--opset", "14", "--exporter", "dynamo")
    assert result.returncode == 0, result.stderr
    assert "asked for opset 14; the dynamo exporter wrote opset 18" in result.stdout
