"""`txcompile compile` end to end: export, optimize, verify against PyTorch, report, inspect."""

from __future__ import annotations

import json
from pathlib import Path

import onnxruntime as ort
import pytest

from tests.core.test_cli import tx

HF = Path(__file__).parent.parent / "data" / "hf"


def _compile(model: str, tmp_path: Path, *extra: str) -> dict:
    out = tmp_path / "model.onnx"
    result = tx("compile", model, "-o", out, *extra)
    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads(out.with_name("model.report.json").read_text())
    assert report["export"]["max_diff"] <= 1e-4
    assert report["verification"]["reference"] == "pytorch"
    assert report["verification"]["passed"] is True and report["verification"]["max_diff"] <= 1e-4
    assert all(p["status"] != "rolled back" for p in report["passes"]), report["passes"]
    ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    shown = tx("inspect", out)
    assert shown.returncode == 0 and "passes" in shown.stdout
    return report


@pytest.fixture(scope="module", params=["tiny-bert", "tiny-llama", "tiny-vit"])
def compiled(request, tmp_path_factory) -> tuple[str, Path, dict]:
    """Each built-in compiled once; the tests below read the model and its report."""
    folder = tmp_path_factory.mktemp(request.param)
    return request.param, folder / "model.onnx", _compile(request.param, folder)


def test_compile_builtins(compiled):
    _, _, report = compiled
    assert report["export"]["exporter"] == "dynamo"
    assert report["analysis"]["parameters"] > 0


def test_the_report_says_what_the_run_cost(compiled):
    """Seconds per phase and the process's peak memory, as the report and the printout show."""
    _, out, report = compiled
    seconds = report["resources"]["seconds"]
    assert list(seconds) == ["input", "passes", "verification", "write"]
    assert all(value >= 0 for value in seconds.values()) and seconds["passes"] > 0
    assert report["resources"]["peak_rss_mib"] > 50  # an interpreter with torch and onnxruntime
    shown = tx("inspect", out).stdout
    assert f"time: export {report['export']['seconds']:.1f} s, input" in shown and "peak memory" in shown


def test_run_reference_compares_with_pytorch(compiled):
    name, out, _ = compiled
    result = tx("run", out, "--reference", "--batch", "3")
    assert result.returncode == 0, result.stderr
    assert f"max diff vs PyTorch ({name})" in result.stdout


def test_compile_with_torchscript_and_static_shapes(tmp_path):
    report = _compile(
        "tiny-bert", tmp_path, "--exporter", "torchscript", "--static", "--batch", "3", "--seq", "12"
    )
    assert report["export"]["exporter"] == "torchscript"
    assert report["verification"]["inputs"]["input_ids"]["shape"] == [3, 12]


def test_verification_failure_exits_1(tmp_path):
    out = tmp_path / "m.onnx"
    result = tx("compile", "tiny-bert", "-o", out, "--atol", "1e-12")
    assert result.returncode == 1, result.stderr
    assert "verification failed" in result.stderr
    assert out.exists()  # the model is still written, with a report that says it failed
    assert json.loads(out.with_name("m.report.json").read_text())["verification"]["passed"] is False


@pytest.mark.slow
@pytest.mark.parametrize("family", ["bert", "llama"])  # GPT-2: tests/attention, tests/norms
def test_compile_hugging_face_folders(family, tmp_path):
    report = _compile(str(HF / family), tmp_path)
    assert any("random" in w for w in report["warnings"])
