"""One .onnx file with its weights inline, written tensor by tensor, and read without them.

Serializing a model into one protobuf message holds it in memory twice more (the proto and
its bytes) for a few seconds. Protobuf merges repeated occurrences of an embedded message
field when it parses ("as if with MergeFrom"), so the file can be the model without its
large initializers followed, for each of them, by a ``graph`` field holding just that
initializer: every reader of ONNX (onnx, onnxruntime, onnx_ir) parses it as the whole model.
Each tensor's bytes go from its external data (a workspace's mapped file) straight to disk.

Reading is the same idea backwards: :func:`read_skeleton` walks the file's protobuf fields
and gives the model with each large inline initializer turned into a reference to where its
bytes lie in the file (external data at their offset), so parsing costs the graph, not the
weights, and the weights go file to file into a workspace.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import mmap
import os

import onnx
import onnx_ir as ir

# field numbers in onnx.proto
_MODEL_GRAPH, _GRAPH_INITIALIZER = 7, 5
_TENSOR_RAW_DATA, _TENSOR_EXTERNAL_DATA, _TENSOR_DATA_LOCATION = 9, 13, 14
# dims, data_type, name, raw_data, doc_string, metadata_props: a tensor with any other field
# (typed data, a segment, external data already) is kept as it is
_PLAIN_TENSOR_FIELDS = {1, 2, 8, 9, 12, 16}
_VARINT, _FIXED64, _LENGTH_DELIMITED, _FIXED32 = 0, 1, 2, 5
MIN_REFERENCED_BYTES = 1024  # smaller tensors stay inline


def save_inline(model: ir.Model, path: str | os.PathLike) -> str:
    """``model`` as one protobuf file, its external tensors read one at a time; returns the
    file's sha256. A second thread hashes each tensor's bytes while the kernel copies them
    (neither holds the GIL), so the digest a report records costs no pass over the file."""
    skeleton = model.clone()
    for graph in skeleton.graphs():
        if graph is not skeleton.graph:  # subgraph weights: few and small, read into memory
            for value in graph.initializers.values():
                tensor = value.const_value
                if isinstance(tensor, ir.ExternalTensor):
                    value.const_value = ir.Tensor(tensor.numpy(), dtype=tensor.dtype, name=tensor.name)
    moved = [v for v in skeleton.graph.initializers.values() if isinstance(v.const_value, ir.ExternalTensor)]
    for value in moved:
        skeleton.graph.initializers.pop(value.name)
    digest = hashlib.sha256()
    with open(path, "wb") as out, concurrent.futures.ThreadPoolExecutor(1) as hasher:
        head = ir.serde.serialize_model(skeleton).SerializeToString()
        out.write(head)
        digest.update(head)
        hashing = None
        for value in moved:
            tensor = value.const_value
            prefix = _initializer_prefix(tensor, value.name)
            out.write(prefix)
            out.flush()
            if hashing is not None:
                hashing.result()
            digest.update(prefix)
            hashing = hasher.submit(_hash_external, digest, tensor)
            tensor.tofile(out)  # file to file in the kernel where it can
        if hashing is not None:
            hashing.result()
    return digest.hexdigest()


def _initializer_prefix(tensor: ir.ExternalTensor, name: str) -> bytes:
    """The fields before one initializer's raw bytes: graph { initializer { header, raw_data } }."""
    header = onnx.TensorProto(name=name, data_type=tensor.dtype.value, dims=tensor.shape.numpy())
    tensor_fields = header.SerializeToString() + _key(_TENSOR_RAW_DATA) + _varint(tensor.nbytes)
    tensor_size = len(tensor_fields) + tensor.nbytes
    graph_fields = _key(_GRAPH_INITIALIZER) + _varint(tensor_size)
    return _key(_MODEL_GRAPH) + _varint(len(graph_fields) + tensor_size) + graph_fields + tensor_fields


def _hash_external(digest, tensor: ir.ExternalTensor) -> None:
    """``digest`` updated with the bytes ``tensor.tofile`` copies, read through a mapping."""
    start = tensor.offset or 0
    end = start + (tensor.length or tensor.nbytes)
    if end == start:  # nothing to read, and an empty file cannot be mapped
        return
    with (
        open(tensor.path, "rb") as source,
        mmap.mmap(source.fileno(), 0, access=mmap.ACCESS_READ) as data,
        memoryview(data) as view,
        view[start:end] as part,
    ):
        digest.update(part)


def read_skeleton(path: str | os.PathLike) -> bytes | None:
    """The model file as protobuf bytes in which every main-graph initializer with at least
    MIN_REFERENCED_BYTES of raw data refers to those bytes in the file itself (``location``
    its name). None when the file is not the protobuf it should be: the caller parses it the
    usual way and reports what is wrong."""
    with open(path, "rb") as file:
        if os.fstat(file.fileno()).st_size == 0:
            return None
        with mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ) as data:
            try:
                return bytes(_model(data, os.path.basename(path)))
            except _NotProtobuf:
                return None


class _NotProtobuf(Exception):
    pass


def _model(data, location: str) -> bytearray:
    out = bytearray()
    for field, wire, start, value, end in _fields(data, 0, len(data)):
        if field == _MODEL_GRAPH and wire == _LENGTH_DELIMITED:
            graph = _graph(data, value, end, location)
            out += _key(_MODEL_GRAPH) + _varint(len(graph)) + graph
        else:
            out += data[start:end]
    return out


def _graph(data, begin: int, finish: int, location: str) -> bytearray:
    out = bytearray()
    for field, wire, start, value, end in _fields(data, begin, finish):
        if field == _GRAPH_INITIALIZER and wire == _LENGTH_DELIMITED:
            tensor = _referenced_tensor(data, value, end, location)
            if tensor is not None:
                out += _key(_GRAPH_INITIALIZER) + _varint(len(tensor)) + tensor
                continue
        out += data[start:end]
    return out


def _referenced_tensor(data, begin: int, finish: int, location: str) -> bytearray | None:
    """The TensorProto without its raw data and with a reference to it; None to keep it as it
    is (small, not plain raw data, or raw data given more than once)."""
    fields = list(_fields(data, begin, finish))
    raw = [f for f in fields if f[0] == _TENSOR_RAW_DATA and f[1] == _LENGTH_DELIMITED]
    if len(raw) != 1 or not {f[0] for f in fields} <= _PLAIN_TENSOR_FIELDS:
        return None
    _, _, _, offset, end = raw[0]
    if end - offset < MIN_REFERENCED_BYTES:
        return None
    out = bytearray()
    for field, _, start, _, stop in fields:
        if field != _TENSOR_RAW_DATA:
            out += data[start:stop]
    for key, value in (("location", location), ("offset", str(offset)), ("length", str(end - offset))):
        entry = _string(1, key) + _string(2, value)
        out += _key(_TENSOR_EXTERNAL_DATA) + _varint(len(entry)) + entry
    out += _varint(_TENSOR_DATA_LOCATION << 3 | _VARINT) + _varint(onnx.TensorProto.EXTERNAL)
    return out


def _fields(data, begin: int, finish: int):
    """(field number, wire type, where the field starts, where its value starts, its end)."""
    position = begin
    while position < finish:
        start = position
        key, position = _read_varint(data, position, finish)
        field, wire = key >> 3, key & 7
        if wire == _VARINT:
            value, (_, end) = position, _read_varint(data, position, finish)
        elif wire in (_FIXED64, _FIXED32):
            value, end = position, position + (8 if wire == _FIXED64 else 4)
        elif wire == _LENGTH_DELIMITED:
            length, value = _read_varint(data, position, finish)
            end = value + length
        else:  # groups: not in onnx.proto
            raise _NotProtobuf
        if field == 0 or end > finish:
            raise _NotProtobuf
        yield field, wire, start, value, end
        position = end


def _read_varint(data, position: int, finish: int) -> tuple[int, int]:
    number = shift = 0
    while position < finish and shift < 70:
        byte = data[position]
        number |= (byte & 0x7F) << shift
        position += 1
        if not byte & 0x80:
            return number, position
        shift += 7
    raise _NotProtobuf


def _string(field: int, text: str) -> bytes:
    encoded = text.encode()
    return _key(field) + _varint(len(encoded)) + encoded


def _key(field: int) -> bytes:
    return _varint(field << 3 | _LENGTH_DELIMITED)


def _varint(number: int) -> bytes:
    out = bytearray()
    while True:
        low, number = number & 0x7F, number >> 7
        out.append(low | (0x80 if number else 0))
        if not number:
            return bytes(out)
