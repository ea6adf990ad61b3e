"""ONNX emission: the :class:`~.approx.Arith` interface as plain ONNX nodes ORT can run.

Multiplying by 2 becomes ``Add(a, a)`` and by −1 ``Neg(a)``, so the graph itself shows which
multiplications cost a level. A plaintext ``mask`` (0/1, from an attention mask) can ride on the
coefficients, so masking a polynomial costs no extra level.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from txcompile.graph.build import GraphBuilder


class OnnxArith:
    """ONNX nodes through the shared builder; constants are float32 as the graph holds them."""

    def __init__(self, builder: GraphBuilder, mask: ir.Value | None = None) -> None:
        self.b = builder
        self.mask = mask

    def add(self, a, b):
        return self.b.op("Add", a, b)

    def sub(self, a, b):
        return self.b.op("Sub", a, b)

    def mul(self, a, b):
        return self.b.op("Mul", a, b)

    def scale(self, a, c):
        c = float(np.float32(c))  # the constant as the graph holds it
        if c == 1.0:
            return a
        if c == -1.0:
            return self.b.op("Neg", a)
        if c == 2.0:
            return self.b.op("Add", a, a)
        return self.b.op("Mul", a, self.b.const(c))

    def shift(self, a, c):
        return a if float(c) == 0.0 else self.b.op("Add", a, self.b.const(float(c)))

    def coeff(self, a, c):
        if self.mask is None:
            return self.scale(a, c)
        return self.b.op("Mul", a, self.b.op("Mul", self.mask, self.b.const(float(c))))

    def constant_term(self, a, c):
        if self.mask is None:
            return self.shift(a, c)
        return self.b.op("Add", a, self.b.op("Mul", self.mask, self.b.const(float(c))))

    def reduce_sum(self, a, axis):
        return self.b.op("ReduceSum", a, self.b.const([axis], np.int64), keepdims=1)

    def mul_plain(self, a, p):
        return self.b.op("Mul", a, p if isinstance(p, ir.Value) else self.b.const(p, np.float32))

    def add_plain(self, a, p):
        return self.b.op("Add", a, p if isinstance(p, ir.Value) else self.b.const(p, np.float32))

    def power(self, a, p):
        return self.b.op("Pow", a, self.b.const(int(p), np.int64))
