"""onnxruntime's telemetry is off in every session txcompile creates: nothing lands in HOME."""

from __future__ import annotations

import os
import subprocess
import sys


def test_running_a_model_leaves_no_telemetry_in_home(tmp_path, mlp_file):
    home = tmp_path / "home"
    home.mkdir()
    environment = {
        k: v for k, v in os.environ.items() if k not in ("ORT_DISABLE_TELEMETRY", "XDG_CACHE_HOME")
    }
    environment["HOME"] = str(home)
    result = subprocess.run(
        [sys.executable, "-m", "txcompile", "run", mlp_file], capture_output=True, text=True, env=environment
    )
    assert result.returncode == 0, result.stderr
    assert [p for p in home.rglob("*")] == []
