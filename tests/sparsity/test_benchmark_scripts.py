"""The sparsity benchmark scripts run end to end on the tiny BERT config (their --small mode)."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPTS = Path(__file__).resolve().parents[1] / "benchmarks"


def run_script(name: str, *args: str) -> str:
    """The script's stdout, after checking it exited cleanly."""
    done = subprocess.run(
        [sys.executable, str(SCRIPTS / name), *args], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


@pytest.mark.slow
def test_sparsity_bert_times_sparse_matmul_and_the_whole_pipeline():
    stdout = run_script("sparsity_bert.py", "--small", "--pipeline", "--runs", "3")
    diffs = dict(re.findall(r"max diff (\S+) vs pruned dense on the verification inputs (\S+)", stdout))
    assert set(diffs) == {"sparse-matmul", "pipeline"}, stdout
    assert all(float(d) <= 1e-3 for d in diffs.values()), diffs
    assert re.search(r"rewrote (\d+) of", stdout) and "rewrote 0 of" not in stdout


@pytest.mark.slow
def test_sparsity_layers_profiles_every_rewritten_layer():
    stdout = run_script("sparsity_layers.py", "--small", "--profile", "--runs", "6")
    line = r"^(\S+) (fp32 1x32 FFN|fp32 1x32|int8 1x32|structured) M=(\d+): (\S+) ms = (.+)$"
    profiles = re.findall(line, stdout, re.M)
    assert len(profiles) == 12, stdout  # 2 shapes x 2 column-group forms x 2 M, + 2 FFN forms x 2 M
    for _, form, _, total, nodes in profiles:
        ops = set(re.findall(r"(\w+) \d+\.\d+", nodes))
        assert float(total) > 0
        if form == "fp32 1x32":
            assert {"Gather", "FusedMatMul"} <= ops, nodes
        elif form == "fp32 1x32 FFN":  # the up layer stays transposed: its product is a plain MatMul
            assert {"Gather", "MatMul", "Gelu", "FusedMatMul"} <= ops, nodes
        elif form == "int8 1x32":
            assert {"DynamicQuantizeLinear", "Gather"} <= ops and "MatMul" not in ops, nodes
        else:
            assert "Gather" not in ops, nodes
