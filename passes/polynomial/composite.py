"""Softmax, LayerNorm and power-softmax as polynomial schemes over any :class:`~.approx.Arith`.

Written once, run three ways (numpy error, level count, ONNX nodes) like the 1-D polynomials.
"""

from __future__ import annotations

import math
from typing import Any

from .approx import Arith, Chebyshev
from .inverse import NewtonInverse


def normalize(ar: Arith, numerator: Any, total: Any, recip: NewtonInverse) -> Any:
    """numerator / total with total already scaled into the reciprocal's [mid − 1, mid + 1]."""
    r = recip.evaluate(ar, total, t=ar.shift(total, -recip.guess.mid))
    return ar.mul(numerator, r)


def softmax(
    ar: Arith, masked: Arith, xs: Any, weights: Any, exp: Chebyshev, recip: NewtonInverse, axis: int
) -> Any:
    """Softmax of x given xs = x/half, centered on its row mean instead of its (unknowable) max.

    ``weights`` is keep/n_valid (plaintext); ``masked`` multiplies the exp coefficients by it.
    By Jensen, mean(exp(x − mean x)) ≥ 1, so the scaled row sum has a lower bound of s: the
    reciprocal's domain stays narrow. Centering costs one level (the weighted mean).
    """
    mean = ar.reduce_sum(ar.mul_plain(xs, weights), axis)
    t = ar.shift(ar.sub(xs, mean), -exp.mid / exp.half)
    e = exp.evaluate_t(masked, t)
    return normalize(ar, e, ar.reduce_sum(e, axis), recip)


def power_softmax(ar: Arith, x: Any, p: int, offset: float, recip: NewtonInverse, axis: int) -> Any:
    """x^p / (offset + Σ x^p): Power-Softmax, x pre-scaled so the sum lands in the reciprocal's domain."""
    powered = ar.power(x, p)
    return normalize(ar, powered, ar.shift(ar.reduce_sum(powered, axis), offset), recip)


def layernorm(
    ar: Arith, x: Any, n: int, s: float, eps: float, isqrt: NewtonInverse, gamma_root_n, beta, axis: int
) -> Any:
    """(x − mean)/√(var + eps)·γ + β with the variance pre-scaled by s (folded into the centering).

    d' = √s·(x − mean) costs one level (the 1/n of the mean rides on it), Σd'² two,
    1/√(Σd'² + s·n·eps) the Newton depth, and (d'·γ√n)·y one more.
    ``gamma_root_n`` is γ·√n (the √n undoes the pre-scaled variance).
    """
    root = math.sqrt(s)
    d = ar.sub(ar.scale(x, root), ar.scale(ar.reduce_sum(x, axis), root / n))
    total = ar.shift(ar.reduce_sum(ar.mul(d, d), axis), s * n * eps)
    y = isqrt.evaluate(ar, total, t=ar.shift(total, -isqrt.guess.mid))
    out = ar.mul(ar.mul_plain(d, gamma_root_n), y)
    return out if beta is None else ar.add_plain(out, beta)
