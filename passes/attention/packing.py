"""Whether Q, K and V project one input, so one GEMM can compute all three (packed QKV).

Two graph forms: three MatMul(X, W) with constant W read only by this site, or the three
outputs of one Split of MatMul(X, W) (+ b) — ViT's and GPT-2's packed QKV, GPT-2's Conv1D as
Reshape(Gemm(Reshape(X))). The projections must be private to the site: fusing it must free
them, or packing would compute them twice.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from txcompile.graph.build import side_by_side
from txcompile.graph.constants import constant_array, constant_tensor
from txcompile.graph.probe import Shapes
from txcompile.passes.attention.sites import Site

# (X, [Wq | Wk | Wv] as an array or a tensor computed when written, packed bias or None)
Packed = tuple[ir.Value, np.ndarray | ir.TensorProtocol, np.ndarray | None]


def packed_projection(
    site: Site, query: ir.Value, key: ir.Value, value: ir.Value, shapes: Shapes
) -> Packed | None:
    """(X, [Wq | Wk | Wv], bias or None) when Q, K, V project one input for this site only."""
    targets = {id(site.qk), id(site.pv)}
    split = _split_projection(query, key, value, targets, shapes)
    if split is not None:
        return split
    weights, source = [], None
    for projected in (query, key, value):
        producer = projected.producer()
        if producer is None or producer.op_type != "MatMul" or projected.is_graph_output():
            return None
        if not all(_only_feeds(user, targets) for user, _ in projected.uses()):
            return None
        tensor = constant_tensor(producer.inputs[1])
        if tensor is None or len(tensor.shape) != 2 or (weights and tensor.shape[0] != weights[0].shape[0]):
            return None
        if source is not None and producer.inputs[0] is not source:
            return None
        source = producer.inputs[0]
        weights.append(tensor)
    return source, side_by_side(weights), None  # computed when written: checks read its shape


def _split_projection(query, key, value, targets, shapes: Shapes) -> Packed | None:
    split = query.producer()
    if split is None or split.op_type != "Split" or list(split.outputs) != [query, key, value]:
        return None
    packed = split.inputs[0]
    rank = packed.shape.rank() if packed.shape is not None else 3
    if split.attributes.get_int("axis", 0) not in (-1, rank - 1) or not _private(packed):
        return None
    if not all(_only_feeds(user, targets) for output in split.outputs for user, _ in output.uses()):
        return None
    bias = None
    producer = packed.producer()
    if producer is not None and producer.op_type == "Add":
        for i in (0, 1):
            array = constant_array(producer.inputs[i])
            if array is not None and array.ndim == 1:
                bias, packed = array.astype(np.float32), producer.inputs[1 - i]
                break
        if bias is None or not _private(packed):
            return None
        producer = packed.producer()
    if producer is not None and producer.op_type == "Reshape" and bias is None:
        return _flattened_gemm(producer, split, shapes)
    if producer is None or producer.op_type != "MatMul":
        return None
    weights = constant_array(producer.inputs[1])
    if weights is None or weights.ndim != 2 or weights.shape[1] % 3:
        return None
    sizes_array = constant_array(split.inputs[1]) if len(split.inputs) > 1 and split.inputs[1] else None
    sizes = sizes_array.tolist() if sizes_array is not None else None
    if sizes is not None and len(set(sizes)) != 1:
        return None
    return producer.inputs[0], weights.astype(np.float32), bias


def _flattened_gemm(reshape: ir.Node, split: ir.Node, shapes: Shapes) -> Packed | None:
    """GPT-2's Conv1D: Reshape(Gemm(Reshape(X, [-1, in]), W, b), [B, S, 3·hidden]) → (X, W, b)."""
    gemm = reshape.inputs[0].producer()
    if gemm is None or gemm.op_type != "Gemm" or not _private(reshape.inputs[0]):
        return None
    plain = {"alpha": 1.0, "beta": 1.0, "transA": 0, "transB": 0}
    if any(gemm.attributes.get(k) is not None and gemm.attributes[k].value != v for k, v in plain.items()):
        return None
    weights = constant_array(gemm.inputs[1])
    has_bias = len(gemm.inputs) > 2 and gemm.inputs[2] is not None
    bias = constant_array(gemm.inputs[2]) if has_bias else None
    flatten = gemm.inputs[0].producer()
    if weights is None or (has_bias and bias is None) or flatten is None or flatten.op_type != "Reshape":
        return None
    bias_array = bias if bias is not None else np.zeros(weights.shape[1], np.float32)
    source, packed = flatten.inputs[0], split.inputs[0]
    source_shape, packed_shape = shapes(source), shapes(packed)
    rows, columns = weights.shape[0], weights.shape[1]
    if source_shape is None or packed_shape is None or len(source_shape) != 3 or columns % 3:
        return None
    if (
        source_shape[2] != rows
        or packed_shape != (*source_shape[:2], columns)
        or bias_array.shape != (columns,)
    ):
        return None
    return source, weights.astype(np.float32), bias_array.astype(np.float32)


def _private(value: ir.Value) -> bool:
    """Read by one node and not a graph output: fusing its reader frees it."""
    return len(value.uses()) == 1 and not value.is_graph_output()


def _only_feeds(node: ir.Node, targets: set[int], budget: int = 64) -> bool:
    """Whether everything ``node`` computes ends in ``targets`` (so fusing the site frees it).

    A bounded walk over the nodes downstream of ``node``, stopping at the targets: shape
    arithmetic that only feeds the site's own reshapes counts as freed too.
    """
    seen, frontier = {id(node)}, [node]
    while frontier:
        current = frontier.pop()
        if id(current) in targets:
            continue
        if any(output.is_graph_output() for output in current.outputs):
            return False
        users = [user for output in current.outputs for user, _ in output.uses()]
        if not users:
            return False
        for user in users:
            if id(user) not in seen:
                seen.add(id(user))
                frontier.append(user)
        if len(seen) > budget:
            return False
    return True
