"""The column-group form of a block-sparse MatMul, the one that beats dense GEMM in plain ORT.

W [K, N] is cut into G = N / bn groups of ``bn`` output columns. Group g reads only the input
rows where it has a nonzero; every group is padded to the same count ``c`` (padding rows carry
zero weights, so the result is exact). The graph then is::

    X [..., K] -> Reshape [M, K] -> Transpose [K, M] -> Gather rows [G*c, M] -> Reshape [G, c, M]
      -> FusedMatMul(., Wp [G, c, bn], transA) [G, M, bn] -> Transpose [M, G, bn] -> Reshape [..., N]

so one batched product does G small dense products of c/K the original work; reading the
gathered rows transposed inside the GEMM makes the way back to [M, N] move rows of bn values
instead of single elements (2.7x cheaper than Transpose [N, M] -> [M, N] at 768->3072, M = 512,
measured). Inside a transposed chain (see ``transposed_out``) the product is
MatMul(Wp [G, bn, c], .) = [G, bn, M], which is Y^T as it stands. With int8 the
activations are quantized once (DynamicQuantizeLinear) before the Gather, the packed weights
are int8 with a scale per output column, and MatMulInteger([G, M, c] uint8, [G, c, bn] int8)
does the products.
ScatterND with reduction is deliberately not used (wrong with several threads in ORT).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx_ir as ir

from txcompile.graph.build import GraphBuilder
from txcompile.graph.nodes import MS_DOMAIN
from txcompile.passes.targets import int8_matmul

from . import blocks


@dataclasses.dataclass
class ColumnGroups:
    rows: np.ndarray  # [G, c] input row per slot (padding repeats a row with zero weights)
    weights: np.ndarray  # [G, bn, c] packed weights, transposed for MatMul(Wp, X)
    k: int
    n: int

    @property
    def groups(self) -> int:
        return self.rows.shape[0]

    @property
    def width(self) -> int:  # c
        return self.rows.shape[1]

    @property
    def cols(self) -> int:  # bn
        return self.weights.shape[1]

    @property
    def density(self) -> float:
        """Multiply-adds kept, as a fraction of the dense layer's."""
        return self.width / self.k

    def describe(self) -> str:
        return f"column groups bn={self.cols} c={self.width} of K={self.k} ({self.density:.1%} of dense MACs)"


def pack(weight: np.ndarray, cols: int) -> ColumnGroups | None:
    """Pack W [K, N] into groups of ``cols`` columns; None when N is not a multiple of ``cols``."""
    k, n = weight.shape
    if n % cols:
        return None
    per_group = blocks.group_rows(weight, cols)
    width = max(1, max(len(rows) for rows in per_group))
    rows = np.zeros((n // cols, width), dtype=np.int64)
    packed = np.zeros((n // cols, cols, width), dtype=weight.dtype)
    for g, live in enumerate(per_group):
        rows[g, : len(live)] = live
        rows[g, len(live) :] = live[0] if len(live) else 0
        packed[g, :, : len(live)] = weight[live, g * cols : (g + 1) * cols].T
    return ColumnGroups(rows, packed, k, n)


def estimated_cost(groups: ColumnGroups) -> float:
    """Relative to dense (1.0): kept MACs plus the gather's copies, which cost ~8 MACs each."""
    return groups.density * (1.0 + 8.0 / groups.cols)


def best_packing(weight: np.ndarray, widths=(64, 32, 16, 8)) -> ColumnGroups | None:
    """The group width with the lowest estimated cost."""
    candidates = [p for p in (pack(weight, w) for w in widths) if p is not None]
    return min(candidates, key=estimated_cost, default=None)


def quantize_columns(packed: np.ndarray, bits: int) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric per output column in ±(2^(bits-1) - 1) — 7 bits where the CPU's int8 kernel
    would saturate 8 (int8_matmul.weight_bits): (int8 [G, bn, c], scale [G, bn, 1] float32)."""
    quantized, scale = int8_matmul.quantize_weight(packed.transpose(2, 0, 1), bits)  # per [c] column
    return np.ascontiguousarray(quantized.transpose(1, 2, 0)), scale[..., None]


def emit(
    b: GraphBuilder,
    x: ir.Value,
    groups: ColumnGroups,
    rank: int | None,
    int8: bool = False,
    shared: dict | None = None,
    *,
    transposed_in: bool = False,
    transposed_out: bool = False,
    like: ir.Value | None = None,
) -> tuple[ir.Value, dict[str, float]]:
    """Nodes (on builder ``b``) computing X @ W from ``x`` [..., K]; returns the output value
    and, for int8, the weight quantization error (max abs). Layers reading the same X (Q, K, V) pass the same
    ``shared`` dict and reuse one transpose (and one quantization) of it.

    ``transposed_in``: x already is X^T [K, M]; ``transposed_out``: return Y^T [N, M] (a chain
    of layers with elementwise ops between stays transposed); ``like``: the value whose leading
    dims (and ``rank``) the output takes back, x itself by default."""

    def const(array: np.ndarray) -> ir.Value:
        return b.const(np.ascontiguousarray(array))

    def op(op_type: str, inputs: list, attributes: dict | None = None, domain: str = "") -> ir.Value:
        return b.ops(op_type, inputs, attributes, domain=domain)[0]

    shared = {} if shared is None else shared
    g, c, n = groups.groups, groups.width, groups.n
    if transposed_in:
        shared[(id(x), "xt")] = x
    if (id(x), "xt") not in shared:
        flat = x if rank == 2 else op("Reshape", [x, const(np.array([-1, groups.k], np.int64))])
        shared[(id(x), "xt")] = op("Transpose", [flat], {"perm": [1, 0]})
    xt = shared[(id(x), "xt")]
    info: dict[str, float] = {}
    if int8:
        # activations on the left: ORT fuses MatMulInteger+Cast+Mul into MatMulIntegerToFloat,
        # whose CPU kernel takes uint8 x int8 but not int8 x uint8
        if (id(x), "xq") not in shared:
            shared[(id(x), "xq")] = b.ops("DynamicQuantizeLinear", [xt], outputs=3)
        xq, x_scale, x_zero = shared[(id(x), "xq")]
        picked = op("Gather", [xq, const(groups.rows.reshape(-1))], {"axis": 0})
        picked = op("Reshape", [picked, const(np.array([g, c, -1], np.int64))])
        picked = op("Transpose", [picked], {"perm": [0, 2, 1]})  # [G, M, c]
        weights, scale = quantize_columns(groups.weights, int8_matmul.weight_bits())  # [G, bn, c], [G, bn, 1]
        info["weight_quant_error"] = float(np.abs(weights * scale - groups.weights).max())
        weights_kn = np.ascontiguousarray(weights.transpose(0, 2, 1))  # [G, c, bn]
        acc = op("MatMulInteger", [picked, const(weights_kn), x_zero])
        acc = op("Cast", [acc], {"to": ir.DataType.FLOAT})
        scale_row = const(scale.transpose(0, 2, 1))  # [G, 1, bn]
        product = op("Mul", [acc, op("Mul", [scale_row, x_scale])])  # [G, M, bn]
        if transposed_out:
            product = op("Transpose", [product], {"perm": [0, 2, 1]})  # [G, bn, M]
            return op("Reshape", [product, const(np.array([n, -1], np.int64))]), info
        out = op("Transpose", [product], {"perm": [1, 0, 2]})  # [M, G, bn]
        out = op("Reshape", [out, const(np.array([-1, n], np.int64))])
    else:
        picked = op("Gather", [xt, const(groups.rows.reshape(-1))], {"axis": 0})
        picked = op("Reshape", [picked, const(np.array([g, c, -1], np.int64))])
        if transposed_out:
            product = op("MatMul", [const(groups.weights), picked])  # [G, bn, M]
            return op("Reshape", [product, const(np.array([n, -1], np.int64))]), info
        # the GEMM reads the gathered rows transposed (transA), so the product comes out as
        # [G, M, bn] and the way back to [M, N] moves rows of bn values, not single elements
        weights_cn = np.ascontiguousarray(groups.weights.transpose(0, 2, 1))  # [G, c, bn]
        product = op("FusedMatMul", [picked, const(weights_cn)], {"transA": 1}, domain=MS_DOMAIN)
        out = op("Transpose", [product], {"perm": [1, 0, 2]})  # [M, G, bn]
        if rank == 2:
            return op("Reshape", [out, const(np.array([-1, n], np.int64))]), info
    if rank == 2:
        return out, info
    lead = op("Shape", [like if like is not None else x], {"end": -1})
    shape = op("Concat", [lead, const(np.array([n], np.int64))], {"axis": 0})
    return op("Reshape", [out, shape]), info
