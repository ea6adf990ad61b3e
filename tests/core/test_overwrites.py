"""No output may replace a file the command reads: the model, its external data, --inputs,
--calib, a factory's .py, a model folder's files, the report; nor may two outputs coincide."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import onnx
import pytest

from tests.conftest import mlp_model
from txcompile import cli


def _digests(folder) -> dict[str, str]:
    return {
        p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()
    }


@pytest.fixture
def folder(tmp_path):
    """A model with external data, its inputs, a factory file, an HF-style folder, a report."""
    onnx.save(
        mlp_model(), tmp_path / "ext.onnx", save_as_external_data=True, location="ext.npz", size_threshold=0
    )
    onnx.save(mlp_model(), tmp_path / "m.onnx")
    np.savez(tmp_path / "x.npz", x=np.ones((2, 8), np.float32))
    (tmp_path / "f.py").write_text("def make():\n    raise SystemExit('never called')\n")
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text(json.dumps({"model_type": "bert"}))
    np.savez(tmp_path / "hf" / "extra.npz", x=np.ones(1))
    (tmp_path / "m.report.json").write_text(json.dumps({"schema": "txcompile-report/1"}))
    return tmp_path


@pytest.mark.parametrize(
    ("argv", "words"),
    [
        (["optimize", "ext.onnx", "-o", "ext.npz"], "reads that file"),
        (["optimize", "ext.onnx", "-o", "ext.onnx"], "equals the input"),
        (["optimize", "m.onnx", "-o", "x.npz", "--inputs", "x.npz"], "reads that file"),
        (["optimize", "m.onnx", "-o", "out.onnx", "--calib", "out.report.json"], "reads that file"),
        (["compile", "f.py:make", "-o", "f.py"], "equals the input"),
        (["compile", "hf", "-o", "hf/config.json"], "equals the input"),
        (["compile", "tiny-bert", "-o", "out.onnx", "--save-export", "out.report.json"], "two outputs"),
        (["compile", "tiny-bert", "-o", "out.onnx", "--save-export", "out.onnx"], "two outputs"),
        (["export", "f.py:make", "-o", "f.py"], "equals the input"),
        (["inspect", "m.report.json", "--html", "m.report.json"], "equals the input"),
        (["inspect", "m.onnx", "--html", "m.report.json"], "reads that file"),
        (["run", "m.onnx", "--inputs", "x.npz", "--save-outputs", "x.npz"], "reads that file"),
        (["run", "m.onnx", "--inputs", "x.npz", "--save-outputs", "x"], "reads that file"),
        (["run", "ext.onnx", "--save-outputs", "ext.npz"], "reads that file"),
        (["run", "m.onnx", "--compare", "ext.onnx", "--save-outputs", "ext.npz"], "reads that file"),
        (["run", "m.onnx", "--reference", "hf", "--save-outputs", "hf/extra.npz"], "reads that file"),
        (["bench", "m.onnx", "ext.onnx", "--json", "ext.npz"], "reads that file"),
        (["bench", "m.onnx", "--json", "m.onnx"], "equals the input"),
    ],
)
def test_no_output_replaces_what_the_command_reads(folder, monkeypatch, capsys, argv, words):
    monkeypatch.chdir(folder)
    before = _digests(folder) | _digests(folder / "hf")
    assert cli.main(argv) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and words in lines[0], lines
    assert _digests(folder) | _digests(folder / "hf") == before
    assert not (folder / "out.onnx").exists()


@pytest.mark.parametrize(
    ("output", "words"),
    [
        ("missing/out.npz", "output folder does not exist"),
        ("sub.npz", "is a folder"),
        ("x" * 250 + ".npz", "file name too long"),
        ("loop/out.npz", "not a usable output path"),
    ],
)
def test_unusable_output_paths(folder, monkeypatch, capsys, output, words):
    monkeypatch.chdir(folder)
    (folder / "sub.npz").mkdir()
    (folder / "loop").symlink_to(folder / "loop")
    assert cli.main(["run", "m.onnx", "--save-outputs", output]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and words in lines[0], lines


def test_a_folder_that_refuses_writes_is_one_line(folder, monkeypatch, capsys):
    import errno

    from txcompile.graph import writes

    def refuse(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(writes.tempfile, "mkdtemp", refuse)
    assert cli.main(["run", str(folder / "m.onnx"), "--save-outputs", str(folder / "y.npz")]) == 2
    assert (
        capsys.readouterr().err.strip()
        == f"txcompile: error: {folder}: cannot write there: Read-only file system"
    )
