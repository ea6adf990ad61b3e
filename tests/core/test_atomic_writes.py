"""A model, its external data and its report appear together or not at all: a writer killed
(kill -9 is simulated by os._exit at a chosen rename) is finished or undone by the next
write, a full disk leaves nothing, and the report's hashes tell a stale pair."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import onnx
import pytest

from tests.conftest import mlp_model
from txcompile import cli
from txcompile.graph import writes

KILLED = textwrap.dedent(
    """
    import os, sys
    real, calls = os.replace, [0]

    def replace(a, b):
        calls[0] += 1
        if calls[0] == int(sys.argv[1]):
            os._exit(9)  # like kill -9: no cleanup runs
        real(a, b)

    os.replace = replace
    from txcompile import cli
    cli.main(sys.argv[2:])
    """
)


def _optimize_killed_at(rename: int, model, out) -> None:
    argv = [
        sys.executable,
        "-c",
        KILLED,
        str(rename),
        "optimize",
        str(model),
        "-o",
        str(out),
        "--passes",
        "analyze",
    ]
    assert subprocess.run(argv, capture_output=True).returncode == 9


def _staging(folder) -> list[str]:
    return [p.name for p in folder.iterdir() if p.name.startswith(writes.STAGING_PREFIX)]


@pytest.fixture
def model(tmp_path):
    path = tmp_path / "in.onnx"
    onnx.save(mlp_model(), path)
    return path


def test_killed_before_the_journal_leaves_the_old_pair(tmp_path, model, capsys):
    out = tmp_path / "out.onnx"
    assert cli.main(["optimize", str(model), "-o", str(out), "--passes", "analyze"]) == 0
    before = (out.read_bytes(), out.with_name("out.report.json").read_bytes())
    _optimize_killed_at(1, model, out)  # the journal's own rename: nothing committed
    assert len(_staging(tmp_path)) == 1
    writes.recover(tmp_path)
    assert _staging(tmp_path) == []
    assert (out.read_bytes(), out.with_name("out.report.json").read_bytes()) == before


def test_killed_between_model_and_report_is_finished_by_the_next_write(tmp_path, model, capsys):
    out = tmp_path / "out.onnx"
    report = out.with_name("out.report.json")
    _optimize_killed_at(3, model, out)  # journal and model renamed, report not
    assert out.exists() and not report.exists()
    writes.write_text(tmp_path / "other.txt", "any later write into the folder recovers it")
    assert _staging(tmp_path) == []
    recorded = json.loads(report.read_text())["files"]
    assert recorded == {"out.onnx": writes.digest(out)}
    assert cli.main(["inspect", str(out)]) == 0
    assert "warning" not in capsys.readouterr().out


def test_inspect_tells_a_stale_pair(tmp_path, model, capsys):
    out = tmp_path / "out.onnx"
    assert cli.main(["optimize", str(model), "-o", str(out), "--passes", "analyze"]) == 0
    other = mlp_model()
    other.graph.name = "rewritten"
    onnx.save(other, out)
    capsys.readouterr()
    assert cli.main(["inspect", str(out)]) == 0
    assert "warning: out.onnx is missing or not the file this report describes" in capsys.readouterr().out


def test_staging_of_a_live_writer_is_left_alone(tmp_path):
    live = tmp_path / f"{writes.STAGING_PREFIX}{os.getpid()}-abc"
    live.mkdir()
    finished = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    dead = tmp_path / f"{writes.STAGING_PREFIX}{finished.stdout.strip()}-abc"
    dead.mkdir()
    (dead / "half-written.onnx").write_bytes(b"\x08")
    writes.recover(tmp_path)
    assert live.exists() and not dead.exists()


def test_staging_without_a_pid_is_removed_once_stale(tmp_path):
    """Earlier versions named staging folders without a pid; an old one is abandoned."""
    stale, fresh = (
        tmp_path / f"{writes.STAGING_PREFIX}k2x9_qab",
        tmp_path / f"{writes.STAGING_PREFIX}m3y8_rcd",
    )
    for folder in (stale, fresh):
        folder.mkdir()
        (folder / "model.onnx").write_bytes(b"\x08")
    old = time.time() - writes.LEGACY_STAGING_AGE_S - 60
    os.utime(stale, (old, old))
    writes.recover(tmp_path)
    assert fresh.exists() and not stale.exists()


def test_a_full_disk_leaves_nothing(tmp_path, model, monkeypatch, capsys):
    from txcompile.graph import modelio

    def full(model, path, **kwargs):
        with open(path, "wb") as out:
            out.write(b"\x08\x09")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(modelio.streamed, "save_inline", full)
    out = tmp_path / "out.onnx"
    assert cli.main(["optimize", str(model), "-o", str(out), "--passes", "analyze"]) == 2
    assert (
        capsys.readouterr().err.strip()
        == f"txcompile: error: {tmp_path}: no space left on the device; nothing was written"
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.onnx"]


def test_save_outputs_is_atomic(tmp_path, model, monkeypatch, capsys):
    import numpy as np

    def full(file, **arrays):
        file.write(b"PK\x03\x04")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(np, "savez", full)
    assert cli.main(["run", str(model), "--save-outputs", str(tmp_path / "y.npz")]) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.onnx"]


def _big_model(path) -> None:
    """The mlp with 32 MB of extra weight, so that writing it takes long enough to be hit."""
    model = mlp_model()
    model.graph.initializer.append(onnx.numpy_helper.from_array(np.ones(8 << 20, np.float32), "unused"))
    onnx.save(model, path)


def _staged(folder) -> set[str]:
    with_names = set()
    for name in _staging(folder):
        with contextlib.suppress(OSError):
            with_names |= {p.name for p in (folder / name).iterdir()}
    return with_names | ({""} if _staging(folder) else set())


@pytest.mark.parametrize(
    "moment",
    # later moments pass too quickly to be hit by a signal: the os._exit tests above stop
    # the writer at each rename instead
    ["staging made", "model half written"],
)
def test_kill_9_while_writing_leaves_the_pair_complete_or_absent(tmp_path, moment):
    """A real SIGKILL at a moment seen in the writer's staging folder."""
    model, out = tmp_path / "in.onnx", tmp_path / "out.onnx"
    _big_model(model)
    reached = {
        "staging made": lambda staged: bool(staged),
        "model half written": lambda staged: "out.onnx" in staged,
    }[moment]
    writer = subprocess.Popen(
        [sys.executable, "-m", "txcompile", "optimize", str(model), "-o", str(out), "--passes", "analyze"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 120
    while not reached(_staged(tmp_path)) and writer.poll() is None and time.monotonic() < deadline:
        time.sleep(0.0005)
    writer.send_signal(signal.SIGKILL)
    assert writer.wait() == -signal.SIGKILL, "the writer finished before the moment was seen"
    writes.recover(tmp_path)
    report = out.with_name("out.report.json")
    assert _staging(tmp_path) == []
    assert out.exists() == report.exists()
    if out.exists():
        assert json.loads(report.read_text())["files"] == {"out.onnx": writes.digest(out)}
    assert sorted(p.name for p in tmp_path.iterdir()) in (
        ["in.onnx"],
        ["in.onnx", "out.onnx", "out.report.json"],
    )
