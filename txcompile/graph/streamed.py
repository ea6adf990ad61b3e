"""One .onnx file with its weights inline, written tensor by tensor.

Serializing a model into one protobuf message holds it in memory twice more (the proto and
its bytes) for a few seconds. Protobuf merges repeated occurrences of an embedded message
field when it parses ("as if with MergeFrom"), so the file can be the model without its
large initializers followed, for each of them, by a ``graph`` field holding just that
initializer: every reader of ONNX (onnx, onnxruntime, onnx_ir) parses it as the whole model.
Each tensor's bytes go from its external data (a workspace's mapped file) straight to disk.
"""

from __future__ import annotations

import os

import onnx
import onnx_ir as ir

_MODEL_GRAPH, _GRAPH_INITIALIZER, _TENSOR_RAW_DATA = 7, 5, 9  # field numbers in onnx.proto
_LENGTH_DELIMITED = 2


def save_inline(model: ir.Model, path: str | os.PathLike) -> None:
    """``model`` as one protobuf file, its external tensors read one at a time."""
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
    with open(path, "wb") as out:
        out.write(ir.serde.serialize_model(skeleton).SerializeToString())
        for value in moved:
            _write_initializer(out, value.const_value, value.name)


def _write_initializer(out, tensor: ir.ExternalTensor, name: str) -> None:
    header = onnx.TensorProto(name=name, data_type=tensor.dtype.value, dims=tensor.shape.numpy())
    tensor_fields = header.SerializeToString() + _key(_TENSOR_RAW_DATA) + _varint(tensor.nbytes)
    tensor_size = len(tensor_fields) + tensor.nbytes
    graph_fields = _key(_GRAPH_INITIALIZER) + _varint(tensor_size)
    out.write(_key(_MODEL_GRAPH) + _varint(len(graph_fields) + tensor_size) + graph_fields + tensor_fields)
    out.flush()
    tensor.tofile(out)  # file to file in the kernel where it can


def _key(field: int) -> bytes:
    return _varint(field << 3 | _LENGTH_DELIMITED)


def _varint(number: int) -> bytes:
    out = bytearray()
    while True:
        low, number = number & 0x7F, number >> 7
        out.append(low | (0x80 if number else 0))
        if not number:
            return bytes(out)
