"""The sparsity benchmark scripts run end to end on the tiny BERT config (their --small mode)."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPTS = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.mark.slow
def test_sparsity_bert_times_sparse_matmul_and_the_whole_pipeline():
    script = SCRIPTS / "sparsity_bert.py"
    done = subprocess.run(
        [sys.executable, str(script), "--small", "--pipeline", "--runs", "3"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    diffs = dict(re.findall(r"max diff (\S+) vs pruned dense on the verification inputs (\S+)", done.stdout))
    assert set(diffs) == {"sparse-matmul", "pipeline"}, done.stdout
    assert all(float(d) <= 1e-3 for d in diffs.values()), diffs
    assert re.search(r"rewrote (\d+) of", done.stdout) and "rewrote 0 of" not in done.stdout
