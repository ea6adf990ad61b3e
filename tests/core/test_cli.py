"""The CLI through a real subprocess: happy paths, report views, and every bad input."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

from tests.conftest import mlp_model


def tx(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "txcompile", *map(str, args)], capture_output=True, text=True, cwd=cwd
    )


def _digest(path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _bad(result: subprocess.CompletedProcess, code: int, words: str) -> None:
    assert result.returncode == code, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    assert words in lines[0], lines[0]


@pytest.fixture
def optimized(tmp_path, mlp_file):
    out = tmp_path / "out.onnx"
    result = tx("optimize", mlp_file, "-o", out)
    assert result.returncode == 0, result.stderr
    return out, result


def test_passes_lists_passes_and_pipelines():
    result = tx("passes")
    assert result.returncode == 0
    for name in ("fold-constants", "simplify-shapes", "remove-unused", "analyze", "cpu", "gpu"):
        assert name in result.stdout


def test_optimize_writes_model_and_report(optimized, mlp_file):
    out, result = optimized
    report = json.loads(out.with_name("out.report.json").read_text())
    assert report["schema"] == "txcompile-report/1"
    assert report["verification"]["passed"] is True and report["verification"]["max_diff"] <= 1e-4
    assert report["ops"]["before"]["Reshape"] == 2 and report["ops"]["after"].get("Reshape") == 1
    assert "Identity" not in report["ops"]["after"]
    names = [p["name"] for p in report["passes"]]
    assert names[-1] == "analyze" and report["analysis"]["flops_by_op"]["MatMul"] > 0
    assert "passes" in result.stdout and "verification passed" in result.stdout
    onnx.checker.check_model(onnx.load(out))


def test_inspect_table_json_and_html(optimized, tmp_path):
    out, _ = optimized
    shown = tx("inspect", out)
    assert shown.returncode == 0 and "simplify-shapes" in shown.stdout and "Reshape" in shown.stdout
    as_json = tx("inspect", out.with_name("out.report.json"), "--json")
    assert json.loads(as_json.stdout)["output"] == str(out)
    page = tmp_path / "report.html"
    assert tx("inspect", out, "--html", page).returncode == 0
    assert "<table>" in page.read_text() and "reshape-reshape" in page.read_text()


def test_passes_and_disable_pass(tmp_path, mlp_file):
    out = tmp_path / "only.onnx"
    assert (
        tx(
            "optimize",
            mlp_file,
            "-o",
            out,
            "--passes",
            "remove-identity,simplify-shapes",
            "--disable-pass",
            "simplify-shapes",
        ).returncode
        == 0
    )
    report = json.loads(out.with_name("only.report.json").read_text())
    assert [p["name"] for p in report["passes"]] == ["remove-identity"]


def test_run_prints_outputs_and_compares(optimized, mlp_file, tmp_path):
    out, _ = optimized
    feeds = tmp_path / "x.npz"
    np.savez(feeds, x=np.ones((3, 8), dtype=np.float32))
    result = tx("run", out, "--inputs", feeds, "--compare", mlp_file)
    assert result.returncode == 0, result.stderr
    assert "x (3, 8)" in result.stdout and "max diff vs" in result.stdout


def test_run_compare_with_a_different_model_fails_verification(tmp_path, mlp_file):
    other = tmp_path / "neg.onnx"
    onnx.save(mlp_model(identity=False), other)
    _bad(tx("run", other, "--compare", mlp_file), 1, "verification failed")


def test_bench_side_by_side(optimized, mlp_file, tmp_path):
    out, _ = optimized
    timings = tmp_path / "t.json"
    result = tx("bench", mlp_file, out, "--batch", "1,4", "--seq", "8", "--iters", "5", "--json", timings)
    assert result.returncode == 0, result.stderr
    rows = json.loads(timings.read_text())["timings"]
    assert len(rows) == 4 and rows[0]["speedup"] == 1.0 and all(r["median_ms"] > 0 for r in rows)


# --- bad input: one line on stderr, exit 2, nothing written or overwritten ---


def test_missing_model(tmp_path):
    _bad(tx("optimize", tmp_path / "nope.onnx", "-o", tmp_path / "o.onnx"), 2, "no such file")
    assert not (tmp_path / "o.onnx").exists()


def test_corrupt_and_truncated_models(tmp_path, mlp_file):
    corrupt = tmp_path / "corrupt.onnx"
    corrupt.write_bytes(os.urandom(300))
    _bad(tx("optimize", corrupt, "-o", tmp_path / "o.onnx"), 2, "corrupt.onnx")
    truncated = tmp_path / "cut.onnx"
    truncated.write_bytes(Path(mlp_file).read_bytes()[:-40])
    _bad(tx("optimize", truncated, "-o", tmp_path / "o.onnx"), 2, "cut.onnx")
    assert not (tmp_path / "o.onnx").exists()


def test_external_data_outside_folder(tmp_path):
    folder = tmp_path / "m"
    folder.mkdir()
    path = folder / "m.onnx"
    onnx.save(mlp_model(), path, save_as_external_data=True, location="m.data", size_threshold=0)
    model = onnx.load(path, load_external_data=False)
    for tensor in model.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location":
                entry.value = "../../etc/passwd"
    onnx.save(model, path)
    _bad(tx("optimize", path, "-o", tmp_path / "o.onnx"), 2, "outside the model's folder")


def test_external_data_missing(tmp_path):
    path = tmp_path / "m.onnx"
    onnx.save(mlp_model(), path, save_as_external_data=True, location="m.data", size_threshold=0)
    (tmp_path / "m.data").unlink()
    _bad(tx("run", path), 2, "missing")


def test_unknown_pass_and_target(tmp_path, mlp_file):
    _bad(
        tx("optimize", mlp_file, "-o", tmp_path / "o.onnx", "--passes", "fold-constants,warp"),
        2,
        "unknown pass 'warp'",
    )
    _bad(tx("optimize", mlp_file, "-o", tmp_path / "o.onnx", "--target", "tpu"), 2, "unknown target")
    assert not (tmp_path / "o.onnx").exists()


def test_output_equal_to_input_is_never_overwritten(mlp_file):
    before = _digest(mlp_file)
    _bad(tx("optimize", mlp_file, "-o", mlp_file), 2, "equals the input")
    assert _digest(mlp_file) == before


def test_existing_output_survives_a_failed_run(tmp_path, mlp_file):
    out = tmp_path / "keep.onnx"
    out.write_bytes(b"precious")
    corrupt = tmp_path / "corrupt.onnx"
    corrupt.write_bytes(b"\x08\x01garbage")
    _bad(tx("optimize", corrupt, "-o", out), 2, "corrupt.onnx")
    assert out.read_bytes() == b"precious"


def test_bad_inputs_file(tmp_path, mlp_file):
    feeds = tmp_path / "x.npz"
    np.savez(feeds, y=np.ones((1, 8), dtype=np.float32))
    _bad(tx("run", mlp_file, "--inputs", feeds), 2, "lack x")


def test_inspect_without_report(mlp_file):
    _bad(tx("inspect", mlp_file), 2, "no report")


def test_debug_shows_the_traceback(tmp_path):
    result = tx("--debug", "optimize", tmp_path / "nope.onnx", "-o", tmp_path / "o.onnx")
    assert result.returncode == 2
    assert "Traceback" in result.stderr and "no such file" in result.stderr.splitlines()[-1]


def test_bad_model_spec(tmp_path):
    _bad(tx("compile", "no-such-model", "-o", tmp_path / "o.onnx"), 2, "no-such-model")
    broken = tmp_path / "broken.py"
    broken.write_text("raise ImportError('nope')\n")
    _bad(tx("compile", f"{broken}:factory", "-o", tmp_path / "o.onnx"), 2, "broken.py")
    assert not (tmp_path / "o.onnx").exists()
