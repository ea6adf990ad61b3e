"""How big a model's protobuf would be, without serialising it.

``ModelProto.ByteSize()`` serialises the whole model with the installed protobuf (upb): about a
second and the model's size again in memory on BERT-base, and an EncodeError above 2 GiB, which
is exactly where the answer matters. Tensors are nearly all of a model's bytes, so their data
(initializers and tensor attributes, in subgraphs too) plus a generous allowance per node is a
safe estimate for choosing between in-memory bytes and external data.
"""

from __future__ import annotations

import onnx

PROTOBUF_LIMIT = 2**31 - 2**24  # leave headroom below 2 GiB for the graph itself
NODE_ALLOWANCE = 4096  # bytes per node, value info and small attribute, far above typical

_FIELD_BYTES = {"float_data": 4, "int32_data": 4, "int64_data": 8, "double_data": 8, "uint64_data": 8}


def tensor_bytes(tensor: onnx.TensorProto) -> int:
    size = len(tensor.raw_data) + sum(len(s) for s in tensor.string_data)
    for field, width in _FIELD_BYTES.items():
        size += len(getattr(tensor, field)) * width
    return size


def estimated_bytes(model: onnx.ModelProto) -> int:
    """An upper estimate of ``model.ByteSize()`` (external data not counted, as protobuf does not)."""
    total = 0
    graphs = [model.graph, *(f for f in model.functions)]
    while graphs:
        graph = graphs.pop()
        total += sum(tensor_bytes(t) for t in getattr(graph, "initializer", []))
        nodes = graph.node
        total += NODE_ALLOWANCE * (len(nodes) + len(getattr(graph, "value_info", [])) + 4)
        for node in nodes:
            for attribute in node.attribute:
                if attribute.HasField("t"):
                    total += tensor_bytes(attribute.t)
                total += sum(tensor_bytes(t) for t in attribute.tensors)
                if attribute.HasField("g"):
                    graphs.append(attribute.g)
                graphs.extend(attribute.graphs)
    return total


def fits_in_protobuf(model: onnx.ModelProto, limit: int = PROTOBUF_LIMIT) -> bool:
    return estimated_bytes(model) < limit


def ir_tensor_bytes(model) -> int:
    """The bytes of an onnx_ir model's initializers, in every graph (read from their headers:
    external tensors are not loaded)."""
    return sum(v.const_value.nbytes for g in model.graphs() for v in g.initializers.values() if v.const_value)
