"""Property fuzzing (hypothesis, derandomized) of what a user or a downloaded file hands every
command: flags and their values, --inputs files, reports and txcompile's own model metadata.
Whatever is given: exit 0, 1 or 2 (never 3), one line on stderr (argparse's usage and error
excepted), no traceback, every input's bytes unchanged, no staging left behind.
TXCOMPILE_FUZZ_EXAMPLES raises the number of examples per property (default 20)."""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import onnx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from tests.conftest import mlp_model
from txcompile import cli
from txcompile.graph import writes

EXAMPLES = int(os.environ.get("TXCOMPILE_FUZZ_EXAMPLES", "20"))
FUZZ = settings(
    max_examples=EXAMPLES,
    derandomize=True,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A model, its report, an inputs .npz and a folder, made once; each example works in a
    copy of them."""
    folder = tmp_path_factory.mktemp("fuzz")
    onnx.save(mlp_model(), folder / "m.onnx")
    np.savez(folder / "x.npz", x=np.ones((2, 8), np.float32))
    with contextlib.redirect_stdout(io.StringIO()):
        assert cli.main(["optimize", str(folder / "m.onnx"), "-o", str(folder / "opt.onnx")]) == 0
    (folder / "sub").mkdir()
    return folder


@contextlib.contextmanager
def _workspace(files: Path):
    folder = Path(tempfile.mkdtemp(prefix="fuzz-"))
    try:
        shutil.copytree(files, folder, dirs_exist_ok=True)
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _digests(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in folder.rglob("*")
        if p.is_file()
    }


OUTPUT_FLAGS = ("-o", "--output", "--html", "--json", "--save-outputs")


def _asked_for(folder: Path, argv: list[str]) -> set[str]:
    """The files the command line names as outputs, which it may replace: the model ``-o``
    names with its report, and other outputs that are neither models nor named as inputs."""
    named = {argv[i + 1] for i in range(len(argv) - 1) if argv[i] in OUTPUT_FLAGS}
    read = {a for i, a in enumerate(argv) if a not in named or i == 0 or argv[i - 1] not in OUTPUT_FLAGS}
    asked = set()
    for i in range(len(argv) - 1):
        value = Path(argv[i + 1])
        if argv[i] in ("-o", "--output"):
            asked |= {value, value.with_name(value.stem + ".report.json")}
        elif argv[i] in OUTPUT_FLAGS and value.suffix not in (".onnx", ".data") and str(value) not in read:
            asked |= {value, writes.npz_path(value)} if argv[i] == "--save-outputs" else {value}
    return {str(p.relative_to(folder)) for p in asked if p.is_relative_to(folder)}


def _check(folder: Path, argv: list[str], capsys) -> int:
    """Run one command in-process and hold it to the promise; returns its exit code."""
    inputs = {k: v for k, v in _digests(folder).items() if k not in _asked_for(folder, argv)}
    capsys.readouterr()
    try:
        code = cli.main(argv)
    except SystemExit as exit_:  # argparse refusing a flag
        code = exit_.code
    err = capsys.readouterr().err
    assert code in (0, 1, 2), (argv, err)
    assert "Traceback" not in err, (argv, err)
    lines = err.strip().splitlines()
    if lines and lines[0].startswith("usage:"):
        assert code == 2 and ": error: " in lines[-1], (argv, err)
    else:
        assert len(lines) <= 1, (argv, err)
    after = _digests(folder)
    assert {k: after.get(k) for k in inputs} == inputs, argv  # nothing that was there changed
    leftovers = [p for p in folder.rglob("*") if p.name.startswith(writes.STAGING_PREFIX)]
    assert not leftovers, (argv, leftovers)
    return code


# --- flags ---------------------------------------------------------------------------------

NUMBERS = ["0", "-1", "1", "3", "0.5", "nan", "inf", "-inf", "1e309", "99999999999", "0x10", ""]
WORDS = ["", " ", "abc", "cpu", "cuda", "analyze", "nope", "a,b", ",", "x=2x8", "x=0x8", "x=-1x8", "é\u202e"]
PATHS = [
    "m.onnx",
    "opt.onnx",
    "opt.report.json",
    "x.npz",
    "sub",
    "missing.onnx",
    "nowhere/out.onnx",
    "out.onnx",
    "out.json",
    "out.html",
    "a" * 300,
]
FLAGS = {
    "optimize": {
        "-o": PATHS,
        "--target": WORDS + ["cpu-fp16", "ckks"],
        "--passes": WORDS + ["analyze,fold-constants", "fuse-attention"],
        "--disable-pass": WORDS,
        "--atol": NUMBERS,
        "--inputs": PATHS,
        "--timeout": NUMBERS,
        "--sparsity": NUMBERS,
        "--block": NUMBERS,
        "--precision": ["fp32", "fp16", "int8", "int4", "bf16", "fp8", ""],
        "--min-cosine": NUMBERS,
        "--no-verify": None,
        "--balanced": None,
    },
    "run": {
        "--inputs": PATHS,
        "--save-outputs": PATHS,
        "--compare": PATHS,
        "--atol": NUMBERS,
        "--timeout": NUMBERS,
        "--batch": NUMBERS,
        "--seq": NUMBERS,
        "--input-shape": WORDS,
        "--device": WORDS,
        "--level-budget": NUMBERS,
        "--text": WORDS,
    },
    "inspect": {"--json": None, "--html": PATHS},
    "bench": {
        "--batch": NUMBERS[:5],
        "--seq": NUMBERS[:5],
        "--threads": NUMBERS[:5],
        "--warmup": ["0", "1", "-1", "x", "nan"],
        "--iters": ["1", "2", "0", "-1", "nan", "x"],
        "--device": WORDS,
        "--json": PATHS,
    },
}
TARGETS = {"optimize": "m.onnx", "run": "m.onnx", "inspect": "opt.onnx", "bench": "m.onnx"}


@st.composite
def command_lines(draw, command: str) -> list[str]:
    flags = FLAGS[command]
    argv = [command, draw(st.sampled_from([TARGETS[command], *PATHS]))]
    if command == "optimize" and draw(st.booleans()):
        argv += ["-o", "out.onnx"]
    for flag in draw(st.lists(st.sampled_from(sorted(flags)), max_size=4)):
        argv.append(flag)
        if flags[flag] is not None:
            argv.append(draw(st.sampled_from(flags[flag])))
    return argv


def _in(folder: Path, argv: list[str]) -> list[str]:
    """Names that are files of the workspace become paths into it."""
    listed = {p.name for p in folder.iterdir()} | set(PATHS)
    return [str(folder / a) if a in listed and a else a for a in argv]


@pytest.mark.parametrize("command", sorted(FLAGS))
def test_flags(files, capsys, command):
    @FUZZ
    @given(argv=command_lines(command))
    def property_(argv):
        with _workspace(files) as folder:
            _check(folder, _in(folder, argv), capsys)

    property_()


# --- --inputs files ------------------------------------------------------------------------

ARRAYS = hnp.arrays(
    dtype=st.sampled_from([np.float32, np.float64, np.int64, np.bool_, np.float16, np.uint8]),
    shape=hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=9),
)


@st.composite
def npz_bytes(draw) -> bytes:
    """Real .npz files with odd members, or such files damaged, or bytes of anything."""
    kind = draw(st.sampled_from(["npz", "damaged", "raw"]))
    if kind == "raw":
        return draw(st.binary(max_size=512))
    members = draw(st.dictionaries(st.sampled_from(["x", "y", "X", "x "]), ARRAYS, max_size=3))
    buffer = io.BytesIO()
    np.savez(buffer, **members)
    data = buffer.getvalue()
    if kind == "damaged" and data:
        cut = draw(st.integers(0, len(data) - 1))
        data = data[:cut] + draw(st.binary(max_size=16))
    return data


@FUZZ
@given(data=npz_bytes(), command=st.sampled_from(["run", "optimize", "compare"]))
def test_inputs_files(files, capsys, data, command):
    with _workspace(files) as folder:
        (folder / "given.npz").write_bytes(data)
        argv = {
            "run": ["run", "m.onnx", "--inputs", "given.npz", "--save-outputs", "y.npz"],
            "optimize": ["optimize", "m.onnx", "-o", "out.onnx", "--inputs", "given.npz"],
            "compare": ["run", "m.onnx", "--compare", "opt.onnx", "--inputs", "given.npz"],
        }[command]
        _check(folder, [str(folder / a) if a.endswith((".onnx", ".npz")) else a for a in argv], capsys)


# --- reports -------------------------------------------------------------------------------

JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4),
    max_leaves=20,
)


@FUZZ
@given(data=st.data(), view=st.sampled_from([[], ["--json"], ["--html", "r.html"]]))
def test_reports(files, capsys, data, view):
    """The report a model was written with, one field (or one field's field) replaced."""
    with _workspace(files) as folder:
        report_path = folder / "opt.report.json"
        report = json.loads(report_path.read_text())
        key = data.draw(st.sampled_from(sorted(report)))
        inner = report[key]
        if isinstance(inner, dict) and inner and data.draw(st.booleans()):
            inner[data.draw(st.sampled_from(sorted(inner)))] = data.draw(JSON)
        elif isinstance(inner, list) and inner and data.draw(st.booleans()):
            inner[data.draw(st.integers(0, len(inner) - 1))] = data.draw(JSON)
        else:
            report[key] = data.draw(JSON)
        report_path.write_text(json.dumps(report))
        target = data.draw(st.sampled_from(["opt.onnx", "opt.report.json"]))
        _check(
            folder,
            ["inspect", str(folder / target), *[str(folder / v) if v.endswith(".html") else v for v in view]],
            capsys,
        )


# --- txcompile's own metadata in a model ----------------------------------------------------

DIMS = st.integers(-2, 2**40) | st.sampled_from(["batch", "seq", "", "n"]) | st.floats() | st.none()
SPEC = st.fixed_dictionaries(
    {
        "name": st.sampled_from(["x", "y", ""]),
        "dtype": st.sampled_from(["float32", "int64", "bool", "float128", "str"]),
    },
    optional={
        "shape": st.lists(DIMS, max_size=3) | JSON,
        "kind": st.sampled_from(["ids", "mask", "positions", "normal", "uniform", "other"]) | JSON,
        "low": st.floats() | st.integers(-(10**30), 10**30) | JSON,
        "high": st.floats() | st.integers(-(10**30), 10**30) | JSON,
    },
)
METADATA = st.one_of(
    st.lists(SPEC, max_size=2).map(json.dumps),
    JSON.map(json.dumps),
    st.text(max_size=40),
)


@FUZZ
@given(
    key=st.sampled_from(
        [
            "txcompile.inputs",
            "txcompile.padded_outputs",
            "txcompile.source",
            "txcompile.task",
            "txcompile.labels",
            "txcompile.tokenizer",
        ]
    ),
    value=METADATA,
    command=st.sampled_from(["run", "optimize", "bench", "reference", "text"]),
)
def test_metadata(files, capsys, key, value, command):
    with _workspace(files) as folder:
        model = mlp_model()
        model.metadata_props.add(key=key, value=value)
        onnx.save(model, folder / "meta.onnx")
        given_ = str(folder / "meta.onnx")
        argv = {
            "run": ["run", given_],
            "optimize": ["optimize", given_, "-o", str(folder / "out.onnx")],
            "bench": ["bench", given_, "--iters", "1", "--warmup", "0"],
            "reference": ["run", given_, "--reference"],
            "text": ["run", given_, "--text", "a text"],
        }[command]
        _check(folder, argv, capsys)
