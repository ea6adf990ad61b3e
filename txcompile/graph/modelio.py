"""Loading and saving ONNX files without surprises.

Loading refuses missing, corrupt or truncated files and external data that is missing or
points outside the model's folder. Saving never overwrites the input and never leaves a
half-written file: everything is written into a temporary folder beside the target and
renamed into place.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import onnx
from google.protobuf.message import DecodeError
from onnx.external_data_helper import ExternalDataInfo, uses_external_data

from txcompile.graph.errors import TxError, one_line

EXTERNAL_DATA_THRESHOLD = 2**31 - 2**24  # models this large keep their weights in a .data file
EXTERNAL_TENSOR_MIN_BYTES = 1024  # smaller tensors stay inline even then


def load_model(path: str | os.PathLike) -> onnx.ModelProto:
    path = Path(path)
    if not path.exists():
        raise TxError(f"{path}: no such file")
    if not path.is_file():
        raise TxError(f"{path}: not a file")
    try:
        model = onnx.load(path, format="protobuf", load_external_data=False)  # never by extension
    except (DecodeError, RuntimeWarning, ValueError, OSError) as err:
        raise TxError(f"{path}: not a valid ONNX model (corrupt or truncated): {one_line(err)}") from None
    if not model.HasField("graph") or not model.graph.node and not model.graph.output:
        raise TxError(f"{path}: not a valid ONNX model (no graph; corrupt or truncated?)")
    _check_external_data(model, path)
    try:
        onnx.load_external_data_for_model(model, str(path.parent))
        onnx.checker.check_model(model)
    except (onnx.checker.ValidationError, OSError, ValueError) as err:
        raise TxError(f"{path}: invalid ONNX model: {one_line(err)}") from None
    return model


def _check_external_data(model: onnx.ModelProto, path: Path) -> None:
    folder = path.parent.resolve()
    for tensor in _all_tensors(model):
        if not uses_external_data(tensor):
            continue
        info = ExternalDataInfo(tensor)
        location = (folder / info.location).resolve()
        if os.path.isabs(info.location) or not location.is_relative_to(folder):
            raise TxError(
                f"{path}: external data {info.location!r} of {tensor.name!r} "
                "points outside the model's folder"
            )
        if not location.is_file():
            raise TxError(f"{path}: external data file {info.location!r} of {tensor.name!r} is missing")
        end = (info.offset or 0) + (info.length or 0)
        if end > location.stat().st_size:
            raise TxError(f"{path}: external data file {info.location!r} is truncated ({tensor.name!r})")


def _all_tensors(model: onnx.ModelProto):
    yield from model.graph.initializer
    for node in model.graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.TENSOR:
                yield attr.t


def same_file(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    a, b = Path(a), Path(b)
    if a.exists() and b.exists():
        return os.path.samefile(a, b)
    return a.resolve() == b.resolve()


def check_output_path(output: str | os.PathLike, *inputs: str | os.PathLike) -> Path:
    """Refuse an output that is one of the inputs or a folder; its folder must exist."""
    output = Path(output)
    for given in inputs:
        if given is not None and same_file(output, given):
            raise TxError(f"{output}: output path equals the input; choose another -o")
    if output.is_dir():
        raise TxError(f"{output}: is a folder; -o takes a file path")
    if not output.parent.resolve().is_dir():
        raise TxError(f"{output.parent}: output folder does not exist")
    return output


def save_model(model: onnx.ModelProto, path: str | os.PathLike) -> list[Path]:
    """Write atomically; models over ~2 GB get their weights in ``<name>.data`` beside them."""
    path = Path(path)
    with tempfile.TemporaryDirectory(prefix=".txcompile-", dir=path.parent) as staging:
        staged = Path(staging) / path.name
        if model.ByteSize() >= EXTERNAL_DATA_THRESHOLD:
            detached = onnx.ModelProto()
            detached.CopyFrom(model)  # saving with external data strips the weights it moves out
            onnx.save(
                detached,
                staged,
                save_as_external_data=True,
                location=path.name + ".data",
                size_threshold=EXTERNAL_TENSOR_MIN_BYTES,
            )
        else:
            onnx.save(model, staged)
        written = []
        for item in sorted(Path(staging).iterdir(), key=lambda p: p.name != path.name + ".data"):
            target = path.parent / item.name
            os.replace(item, target)
            written.append(target)
        return written


def write_text(path: str | os.PathLike, text: str) -> None:
    """Atomic text write (reports)."""
    path = Path(path)
    handle, staged = tempfile.mkstemp(prefix=".txcompile-", dir=path.parent)
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as out:
            out.write(text)
        os.replace(staged, path)
    except BaseException:
        if os.path.exists(staged):
            os.unlink(staged)
        raise
