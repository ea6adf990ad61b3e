"""Seeded mutation fuzzing of the command line: mutated and truncated models through run,
optimize and inspect. Whatever the bytes: exit 0, 1 or 2 (never 3), at most one line on
stderr, no traceback, the input unchanged, no staging left behind. TXCOMPILE_FUZZ_CASES
raises the number of cases (default 300)."""

from __future__ import annotations

import hashlib
import os

import numpy as np
import pytest

from tests.conftest import mlp_model
from txcompile import cli
from txcompile.graph import writes

CASES = int(os.environ.get("TXCOMPILE_FUZZ_CASES", "300"))
SEED = 20261206


def _mutate(data: bytes, rng: np.random.Generator, avoid: range = range(0)) -> bytes:
    """Flip, overwrite, insert or cut bytes, a few times (outside ``avoid``, when it leaves room)."""
    data = bytearray(data)
    for _ in range(int(rng.integers(1, 4))):
        where = int(rng.integers(0, len(data)))
        if where in avoid and len(data) > len(avoid):
            where = int(rng.choice([i for i in (avoid.start - 1, avoid.stop) if 0 <= i < len(data)] or [0]))
            where = max(0, min(len(data) - 1, where + int(rng.integers(-40, 40))))
        action = int(rng.integers(0, 4))
        if action == 0:
            data[where] ^= 1 << int(rng.integers(0, 8))
        elif action == 1:
            data[where : where + 4] = rng.integers(0, 256, 4, dtype=np.uint8).tobytes()
        elif action == 2:
            data[where:where] = rng.integers(0, 256, int(rng.integers(1, 9)), dtype=np.uint8).tobytes()
        else:
            del data[where:]
        if not data:
            data = bytearray(b"\x08")
    return bytes(data)


@pytest.mark.parametrize("case", range(CASES))
def test_mutated_models(tmp_path, capsys, case):
    rng = np.random.default_rng([SEED, case])
    path = tmp_path / "m.onnx"
    path.write_bytes(_mutate(mlp_model().SerializeToString(), rng))
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    out = tmp_path / "out.onnx"
    command = [
        ["run", str(path)],
        ["optimize", str(path), "-o", str(out), "--passes", "analyze"],
        ["optimize", str(path), "-o", str(out), "--no-verify"],
    ][case % 3]
    code = cli.main(command)
    err = capsys.readouterr().err
    assert code in (0, 1, 2), err
    assert len(err.strip().splitlines()) <= 1 and "Traceback" not in err, err
    assert hashlib.sha256(path.read_bytes()).hexdigest() == digest
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(writes.STAGING_PREFIX)]
    if code == 0 and out.exists():
        assert cli.main(["inspect", str(out)]) == 0


@pytest.mark.parametrize("case", range(CASES // 2))
def test_mutated_models_with_weights_read_in_place(tmp_path, capsys, case):
    """optimize reads large inline weights where they lie in the file (streamed.read_skeleton):
    mutations around them, not in them (where they only change the numbers), get the same
    guarantees."""
    from onnx import numpy_helper

    model = mlp_model()
    weight = np.random.default_rng(0).standard_normal((8, 128)).astype(np.float32)
    model.graph.initializer[0].CopyFrom(numpy_helper.from_array(weight[:, :8].repeat(16, 0)[:8], "weight"))
    model.graph.initializer.append(numpy_helper.from_array(weight, "unused_wide"))
    data = model.SerializeToString()
    raw = weight.tobytes()
    at = data.index(raw)
    rng = np.random.default_rng([SEED, 7, case])
    path = tmp_path / "m.onnx"
    path.write_bytes(_mutate(data, rng, avoid=range(at + 8, at + len(raw) - 8)))
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    out = tmp_path / "out.onnx"
    flags = ["--no-verify"] if case % 2 else ["--passes", "analyze"]
    code = cli.main(["optimize", str(path), "-o", str(out), *flags])
    err = capsys.readouterr().err
    assert code in (0, 1, 2), err
    assert len(err.strip().splitlines()) <= 1 and "Traceback" not in err, err
    assert hashlib.sha256(path.read_bytes()).hexdigest() == digest
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(writes.STAGING_PREFIX)]
