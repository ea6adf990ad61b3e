"""Loading and saving ONNX files without surprises.

Loading refuses missing, corrupt or truncated files and external data that is missing,
malformed or points outside the model's folder. Saving goes through
:mod:`txcompile.graph.writes`: staged beside the target, renamed into place with its
external data.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import onnx
import onnx_ir as ir
from google.protobuf.message import DecodeError
from onnx.external_data_helper import uses_external_data

from txcompile.graph import size, streamed, writes
from txcompile.graph.errors import TxError, one_line

EXTERNAL_DATA_THRESHOLD = 2**31 - 2**24  # models this large keep their weights in a .data file
EXTERNAL_TENSOR_MIN_BYTES = 1024  # smaller tensors stay inline even then


def load_model(path: str | os.PathLike) -> onnx.ModelProto:
    return load_model_and_files(path)[0]


def load_model_and_files(
    path: str | os.PathLike, *, weights: bool = True, check: bool = True
) -> tuple[onnx.ModelProto, list[Path]]:
    """The model and every file it was read from: itself and its external data (so that no
    output may replace them). ``weights=False`` checks external data but leaves it on disk,
    for callers that only read the graph and hand the path to onnxruntime. ``check=False``
    leaves the ONNX checker to the caller (:func:`check` on its workspace file: checking a
    proto in memory serializes it, every weight again).
    With neither, large inline weights are not read either: they become external data that
    refers to their bytes in the file itself (streamed.read_skeleton)."""
    path = Path(path)
    if not path.exists():
        raise TxError(f"{path}: no such file")
    if not path.is_file():
        raise TxError(f"{path}: not a file")
    try:
        skeleton = None if weights or check else streamed.read_skeleton(path)
        if skeleton is not None:
            model = onnx.ModelProto.FromString(skeleton)
        else:
            model = onnx.load(path, format="protobuf", load_external_data=False)  # never by extension
    except (DecodeError, RuntimeWarning, ValueError, OSError) as err:
        raise TxError(f"{path}: not a valid ONNX model (corrupt or truncated): {one_line(err)}") from None
    if not model.HasField("graph") or not model.graph.node and not model.graph.output:
        raise TxError(f"{path}: not a valid ONNX model (no graph; corrupt or truncated?)")
    where = _non_utf8_text(model, "model")
    if where:
        raise TxError(f"{path}: invalid ONNX model: {where} is not UTF-8 text")
    data_files = [f for f in _check_external_data(model, path) if f != path.resolve()]
    try:
        if data_files and check:  # the checker reads a model over 2 GiB only from its path
            onnx.checker.check_model(str(path))
        if weights:
            onnx.load_external_data_for_model(model, str(path.parent))
        if not data_files and check:
            onnx.checker.check_model(model)
    except (onnx.checker.ValidationError, OSError, ValueError) as err:
        raise TxError(f"{path}: invalid ONNX model: {one_line(err)}") from None
    return model, [path, *data_files]


def to_ir(model: onnx.ModelProto, source: str, base_dir: str | os.PathLike = "") -> ir.Model:
    """``model`` in onnx_ir, its external data read from ``base_dir`` (the model file's
    folder); a proto it cannot read is an invalid model, in one line."""
    try:
        converted = ir.serde.deserialize_model(model)
    except (ir.serde.SerdeError, ValueError, TypeError) as err:
        raise TxError(f"{source}: invalid ONNX model: {one_line(err)}") from None
    if base_dir:
        ir.external_data.set_base_dir(converted.graph, base_dir)
    return converted


def check(path: str | os.PathLike, source: str) -> None:
    """The ONNX checker on a model file (its external data stays on disk)."""
    try:
        onnx.checker.check_model(str(path))
    except (onnx.checker.ValidationError, OSError, ValueError) as err:
        raise TxError(f"{source}: invalid ONNX model: {one_line(err)}") from None


def _non_utf8_text(message, where: str) -> str | None:
    """Where a string field holds bytes that are not UTF-8: protobuf parses them (as bytes),
    onnx accepts them, onnx_ir cannot write them back."""
    for field, value in message.ListFields():
        if field.type not in (field.TYPE_STRING, field.TYPE_MESSAGE):
            continue
        repeated = field.is_repeated if hasattr(field, "is_repeated") else field.label == field.LABEL_REPEATED
        for index, item in enumerate(value if repeated else [value]):
            name = f"{where}.{field.name}" + (f"[{index}]" if repeated else "")
            if field.type == field.TYPE_STRING and isinstance(item, bytes):
                return name
            if field.type == field.TYPE_MESSAGE and (found := _non_utf8_text(item, name)):
                return found
    return None


def _check_external_data(model: onnx.ModelProto, path: Path) -> list[Path]:
    """The external data files, each checked to be there and long enough."""
    files = set()
    for tensor, location, offset, length in _external_entries(model, path):
        if not location.is_file():
            raise TxError(f"{path}: external data file {location.name!r} of {tensor.name!r} is missing")
        if offset + length > location.stat().st_size:
            raise TxError(f"{path}: external data file {location.name!r} is truncated ({tensor.name!r})")
        dtype = _data_type(tensor)
        if dtype is None:
            raise TxError(f"{path}: invalid ONNX model: {tensor.name[:80]!r} has no data type")
        needed = (
            None if dtype == ir.DataType.STRING else math.ceil(math.prod(tensor.dims) * dtype.bitwidth / 8)
        )
        if length and needed is not None and length != needed:  # needed: as onnx_ir reads it
            raise TxError(
                f"{path}: invalid ONNX model: {tensor.name[:80]!r} has {length} bytes of data; "
                f"its shape {list(tensor.dims)} needs {needed}"
            )
        files.add(location)
    return sorted(files)


def _data_type(tensor: onnx.TensorProto) -> ir.DataType | None:
    """The tensor's type; None for one ONNX does not define."""
    try:
        dtype = ir.DataType(tensor.data_type)
    except ValueError:
        return None
    return None if dtype == ir.DataType.UNDEFINED else dtype


def _external_entries(model: onnx.ModelProto, path: Path):
    """(tensor, file, offset, length) of every external tensor, its fields checked: a file in
    the model's folder, offsets and lengths that are whole numbers."""
    folder = path.parent.resolve()
    for tensor in _all_tensors(model):
        if not uses_external_data(tensor):
            continue
        fields = {entry.key: entry.value for entry in tensor.external_data}
        where = f"{path}: external data of {tensor.name[:80]!r}"
        name = fields.get("location", "")
        if (
            not name
            or "\0" in name
            or len(name) > 1024
            or any(len(p.encode()) > 255 for p in Path(name).parts)
        ):
            raise TxError(f"{where}: unusable location {name[:80]!r}")
        numbers = {k: fields.get(k, "0") or "0" for k in ("offset", "length")}
        if not all(v.isdigit() and len(v) < 20 for v in numbers.values()):
            raise TxError(f"{where}: offset and length must be whole numbers, not {numbers}")
        try:
            location = (folder / name).resolve()
        except (OSError, RuntimeError) as err:  # a symlink loop
            raise TxError(f"{where}: location {name!r} does not resolve: {one_line(err)}") from None
        if os.path.isabs(name) or not location.is_relative_to(folder):
            raise TxError(f"{where}: {name!r} points outside the model's folder")
        yield tensor, location, int(numbers["offset"]), int(numbers["length"])


def _all_tensors(model: onnx.ModelProto):
    """Every tensor a model holds: initializers and tensor attributes, in subgraphs (If, Loop,
    Scan bodies) and local functions too."""
    graphs = [model.graph]
    nodes = [n for f in model.functions for n in f.node]
    while graphs or nodes:
        if graphs:
            graph = graphs.pop()
            yield from graph.initializer
            for sparse in graph.sparse_initializer:
                yield from (sparse.values, sparse.indices)
            nodes.extend(graph.node)
            continue
        for attr in nodes.pop().attribute:
            yield from ([attr.t] if attr.HasField("t") else [])
            yield from attr.tensors
            graphs.extend([attr.g] if attr.HasField("g") else [])
            graphs.extend(attr.graphs)


def save_model(model: onnx.ModelProto | ir.Model, path: str | os.PathLike) -> list[Path]:
    """Write atomically; models over ~2 GB get their weights in ``<name>.data`` beside them.
    An onnx_ir model's external weights (a workspace's) are streamed, never read whole."""
    path = Path(path)
    stage = stage_ir if isinstance(model, ir.Model) else stage_model
    with writes.transaction(path.parent) as staging:
        stage(model, staging, path.name)
        staged = sorted(staging.path.iterdir(), key=lambda p: p.name != path.name + ".data")
    return [path.with_name(p.name) for p in staged]


def stage_model(model: onnx.ModelProto, staging: writes.Staging, name: str) -> Path:
    """Write ``model`` into a staging folder as ``name`` (and ``name.data`` when over ~2 GB)."""
    staged = staging.file(name)
    if not size.fits_in_protobuf(model, EXTERNAL_DATA_THRESHOLD):
        save_with_external_data(model, staged)
    else:
        onnx.save(model, staged)
    return staged


def stage_ir(model: ir.Model, staging: writes.Staging, name: str) -> dict[str, str]:
    """``stage_model`` for an onnx_ir model whose weights may be external (a workspace's):
    streamed to ``name.data`` when over ~2 GB, else into one file (streamed.py). Returns the
    sha256 of each file written, by name."""
    staged = staging.file(name)
    if size.ir_tensor_bytes(model) < EXTERNAL_DATA_THRESHOLD:
        return {name: streamed.save_inline(model, staged)}
    ir.save(
        model,
        staged,
        format="protobuf",
        external_data=name + ".data",
        size_threshold_bytes=EXTERNAL_TENSOR_MIN_BYTES,
    )
    return {p.name: writes.digest(p) for p in (staged, staged.with_name(name + ".data")) if p.exists()}


def save_with_external_data(model: onnx.ModelProto, path: str | os.PathLike) -> None:
    """``path`` and ``path.data``, streamed by onnx_ir: no serialisation of the whole model (which
    protobuf cannot do above 2 GiB), no copy of it, and ``model`` left as it was (onnx.save
    with external data would strip the weights out of it)."""
    path = Path(path)
    ir.save(
        ir.serde.deserialize_model(model),
        path,
        external_data=path.name + ".data",
        size_threshold_bytes=EXTERNAL_TENSOR_MIN_BYTES,
    )
