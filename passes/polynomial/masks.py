"""Additive attention masks: a plaintext addend the client splits into 0/1 weights and a finite part.

Scores below ``MASKED`` are "not allowed": the softmax rules drop them from the row (keep = 0)
instead of approximating exp far outside any calibrated range.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from txcompile.graph.build import GraphBuilder

MASKED = -1e4  # additive mask entries below this are "not allowed"


def split_plain_addend(x: ir.Value, encrypted: set[ir.Value]):
    """x = base + plaintext mask → (base, mask); else (x, None)."""
    node = x.producer()
    if node is None or node.op_type != "Add" or len(x.uses()) != 1:
        return x, None
    a, b = node.inputs
    if a in encrypted and b not in encrypted:
        return a, b
    if b in encrypted and a not in encrypted:
        return b, a
    return x, None


def keep_and_finite(b: GraphBuilder, plain: ir.Value):
    """Client-side: a 0/1 keep mask and the mask's finite part (both plaintext)."""
    allowed = b.op("Greater", plain, b.const(MASKED))
    keep = b.op("Cast", allowed, to=ir.DataType.FLOAT)
    finite = b.op("Where", allowed, plain, b.const(0.0))
    return keep, finite


def masked_sum(values: np.ndarray, raw: np.ndarray) -> np.ndarray:
    """Row sums of ``values`` over the allowed entries of ``raw``."""
    return np.where(raw > MASKED, values, 0.0).sum(-1).ravel()


def softmax_exact(a: np.ndarray) -> np.ndarray:
    """The reference softmax over the allowed entries."""
    z = np.where(a > MASKED, a, -np.inf)
    z = np.exp(z - z.max(-1, keepdims=True))
    return z / z.sum(-1, keepdims=True)
