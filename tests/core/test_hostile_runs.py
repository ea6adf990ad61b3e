"""Models onnxruntime refuses, inputs it cannot take, metadata and reports that say anything,
a model that loops for ever: exit 2 and one line, with onnxruntime's own log kept quiet."""

from __future__ import annotations

import json
import logging

import numpy as np
import onnx
import pytest
from onnx import TensorProto as T
from onnx import helper as h

from tests.conftest import mlp_model
from tests.core.test_cli import _bad, tx
from txcompile import cli


def _save(tmp_path, name, nodes, inputs, outputs, initializers=(), domains=()):
    graph = h.make_graph(nodes, "g", inputs, outputs, initializer=list(initializers))
    model = h.make_model(
        graph, opset_imports=[h.make_opsetid("", 17), *(h.make_opsetid(d, 1) for d in domains)]
    )
    path = tmp_path / name
    onnx.save(model, path)
    return path


@pytest.fixture
def embedding(tmp_path):
    table = onnx.numpy_helper.from_array(np.ones((10, 4), np.float32), "table")
    return _save(
        tmp_path,
        "emb.onnx",
        [h.make_node("Gather", ["table", "ids"], ["y"])],
        [h.make_tensor_value_info("ids", T.INT64, ["batch", "seq"])],
        [h.make_tensor_value_info("y", T.FLOAT, ["batch", "seq", 4])],
        [table],
    )


@pytest.fixture
def loop(tmp_path):
    """A Loop of 2^62 trips: without --timeout it would run for ever."""
    body = h.make_graph(
        [h.make_node("Identity", ["c"], ["c_out"]), h.make_node("Add", ["acc", "one"], ["acc_out"])],
        "body",
        [
            h.make_tensor_value_info("i", T.INT64, []),
            h.make_tensor_value_info("c", T.BOOL, []),
            h.make_tensor_value_info("acc", T.FLOAT, [1]),
        ],
        [h.make_tensor_value_info("c_out", T.BOOL, []), h.make_tensor_value_info("acc_out", T.FLOAT, [1])],
        initializer=[onnx.numpy_helper.from_array(np.ones(1, np.float32), "one")],
    )
    return _save(
        tmp_path,
        "loop.onnx",
        [h.make_node("Loop", ["trips", "go", "x"], ["y"], body=body)],
        [h.make_tensor_value_info("x", T.FLOAT, [1])],
        [h.make_tensor_value_info("y", T.FLOAT, [1])],
        [
            onnx.numpy_helper.from_array(np.array(2**62, np.int64), "trips"),
            onnx.numpy_helper.from_array(np.array(True), "go"),
        ],
    )


def test_ids_outside_the_embedding_table(tmp_path, embedding):
    np.savez(tmp_path / "ids.npz", ids=np.full((2, 3), 99, np.int64))
    _bad(tx("run", embedding, "--inputs", tmp_path / "ids.npz"), 2, "indices element out of data bounds")
    out = tmp_path / "out.onnx"
    _bad(
        tx("optimize", embedding, "-o", out, "--inputs", tmp_path / "ids.npz"),
        2,
        "does not run in onnxruntime",
    )
    assert not out.exists()


def test_models_whose_inputs_differ(tmp_path, embedding, mlp_file):
    _bad(tx("run", embedding, "--compare", mlp_file), 2, f"--compare {mlp_file}: onnxruntime refused it")
    _bad(tx("bench", embedding, mlp_file, "--iters", "1"), 2, "Required inputs (['x']) are missing")


def test_an_op_onnxruntime_lacks_with_no_verify(tmp_path):
    path = _save(
        tmp_path,
        "custom.onnx",
        [h.make_node("Mystery", ["x"], ["y"], domain="my.ops")],
        [h.make_tensor_value_info("x", T.FLOAT, [2])],
        [h.make_tensor_value_info("y", T.FLOAT, [2])],
        domains=["my.ops"],
    )
    _bad(tx("optimize", path, "-o", tmp_path / "out.onnx", "--no-verify"), 2, "my.ops:Mystery")
    _bad(tx("run", path), 2, "is not a registered function/op")


def test_timeout_stops_a_loop_that_never_ends(tmp_path, loop):
    _bad(tx("run", loop, "--timeout", "0.5"), 2, "took over 0.5 s (--timeout)")
    out = tmp_path / "out.onnx"
    _bad(tx("optimize", loop, "-o", out, "--timeout", "0.5"), 2, "took over 0.5 s (--timeout)")
    assert not out.exists()


@pytest.mark.parametrize(
    "recorded",
    [
        "not json",
        json.dumps([1]),
        json.dumps({"mask": 3, "outputs": [0]}),
        json.dumps({"mask": "x", "outputs": [-1]}),
    ],
)
def test_padded_outputs_metadata_is_checked(tmp_path, recorded):
    model = mlp_model()
    model.metadata_props.add(key="txcompile.padded_outputs", value=recorded)
    onnx.save(model, tmp_path / "m.onnx")
    _bad(
        tx("run", tmp_path / "m.onnx", "--compare", tmp_path / "m.onnx"),
        2,
        "padded_outputs metadata is unreadable",
    )


@pytest.mark.parametrize(
    ("value", "words"),
    [
        (h.make_tensor_sequence_value_info("x", T.FLOAT, None), "is a sequence"),
        (h.make_tensor_value_info("x", T.UNDEFINED, [2]), "tensor of UNDEFINED"),
        (h.make_tensor_value_info("x", T.STRING, [2]), "tensor of STRING"),
        (h.make_tensor_value_info("x", T.FLOAT, [2**40]), "values (at most"),
    ],
)
def test_inputs_that_cannot_be_drawn(tmp_path, value, words):
    output = h.make_value_info("y", value.type)
    path = _save(tmp_path, "m.onnx", [h.make_node("Identity", ["x"], ["y"])], [value], [output])
    _bad(tx("run", path), 2, words)


def test_a_batch_too_large_to_draw(mlp_file):
    _bad(tx("run", mlp_file, "--batch", "100000000"), 2, "choose smaller --batch")


def test_metadata_that_is_not_utf8(tmp_path):
    model = mlp_model()
    model.graph.node[0].metadata_props.add(key="k", value="MARKER")
    (tmp_path / "m.onnx").write_bytes(model.SerializeToString().replace(b"MARKER", b"MA\xff\xfeER"))
    _bad(
        tx("optimize", tmp_path / "m.onnx", "-o", tmp_path / "out.onnx"),
        2,
        "metadata_props[0].value is not UTF-8",
    )
    assert not (tmp_path / "out.onnx").exists()


@pytest.mark.parametrize(
    ("report", "words"),
    [
        ({"schema": "txcompile-report/1"}, "damaged report (KeyError"),
        ({"schema": "txcompile-report/1", "ops": 3, "passes": "x"}, "damaged report"),
        (
            '{"schema": "txcompile-report/1", "x": ' + "[" * 100_000 + "]" * 100_000 + "}",
            "not a readable report",
        ),
        ('{"schema": "txcompile-report/1", "x": 1' + "0" * 5000 + "}", "not a readable report"),
    ],
)
@pytest.mark.parametrize("html", [False, True])
def test_corrupt_reports(tmp_path, capsys, report, words, html):
    path = tmp_path / "r.report.json"
    path.write_text(report if isinstance(report, str) else json.dumps(report))
    argv = ["inspect", str(path), *(["--html", str(tmp_path / "r.html")] if html else [])]
    assert cli.main(argv) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and words in lines[0], lines
    assert not (tmp_path / "r.html").exists()


def test_library_logging_is_one_line_and_errors_only(capsys):
    cli._route_library_output(debug=False)
    library = logging.getLogger("onnx_ir.passes")
    try:
        raise ValueError("shape inference gave up\nsecond line")
    except ValueError:
        library.warning("inference failed", exc_info=True)
        library.error("it broke\nand more", exc_info=True)
    import warnings

    warnings.warn("a numpy-style warning", RuntimeWarning, stacklevel=1)
    assert capsys.readouterr().err == "txcompile: error: onnx_ir.passes: it broke\n"
    cli._route_library_output(debug=True)
    try:
        raise ValueError("boom")
    except ValueError:
        library.warning("inference failed", exc_info=True)
    err = capsys.readouterr().err
    assert "txcompile: warning: onnx_ir.passes: inference failed" in err and "Traceback" in err
    cli._route_library_output(debug=False)
