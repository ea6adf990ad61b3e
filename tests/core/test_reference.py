"""`run --reference`: code a model's metadata names is never imported; code the user names is."""

from __future__ import annotations

from pathlib import Path

from tests.core.test_cli import _bad, tx

# Importing this file leaves a marker beside it, so a test can tell whether it ever ran.
FACTORY = """
from pathlib import Path

import torch

Path(__file__).with_name("imported").touch()


class Scale(torch.nn.Module):
    def forward(self, x):
        return x * 2.0


def make():
    return Scale(), {"x": torch.ones(2, 3)}
"""


def _exported(tmp_path: Path) -> tuple[Path, Path, Path]:
    factory = tmp_path / "factory.py"
    factory.write_text(FACTORY)
    out = tmp_path / "scale.onnx"
    result = tx("export", f"{factory}:make", "-o", out)
    assert result.returncode == 0, result.stderr
    marker = tmp_path / "imported"
    marker.unlink()  # the export ran the factory, as the user asked; from here on it must not
    return factory, out, marker


def test_reference_never_imports_a_file_the_model_names(tmp_path):
    factory, out, marker = _exported(tmp_path)
    result = tx("run", out, "--reference")
    _bad(result, 2, "not built in")
    assert f"--reference {factory}:make" in result.stderr  # the line says how to opt in
    assert not marker.exists()


def test_reference_runs_the_model_the_user_names(tmp_path):
    factory, out, marker = _exported(tmp_path)
    result = tx("run", out, "--reference", f"{factory}:make")
    assert result.returncode == 0, result.stderr
    assert f"max diff vs PyTorch ({factory}:make)" in result.stdout
    assert marker.exists()
