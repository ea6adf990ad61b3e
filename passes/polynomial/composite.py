"""Softmax, LayerNorm and power-softmax as polynomial schemes over any :class:`~.approx.Arith`.

Written once, run three ways (numpy error, level count, ONNX nodes) like the 1-D polynomials.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from .approx import Arith, Chebyshev
from .inverse import NewtonInverse


def normalize(ar: Arith, numerator: Any, total: Any, recip: NewtonInverse, k: float = 1.0) -> Any:
    """k · numerator / total with total already scaled into the reciprocal's [mid − 1, mid + 1]."""
    r = recip.evaluate(ar, total, t=ar.shift(total, -recip.guess.mid), k=k)
    return ar.mul(numerator, r)


@dataclasses.dataclass
class SoftmaxPlan:
    """exp on x/2^rounds, its row-sum reciprocal, then ``rounds`` normalize-and-square steps.

    softmax(2z) = softmax(z)² / Σ softmax(z)²: a row spanning R units of scores costs one exp
    on R/2^rounds plus ``rounds`` squarings, each renormalized by a reciprocal whose domain is
    fixed by the math, Σy² ∈ [1/n, 1], however wide the scores were.
    """

    exp: Chebyshev
    recip: NewtonInverse
    rounds: int = 0
    square: NewtonInverse | None = None  # 1/(s·Σy²) on [s·lo, s·lo + 2]
    square_scale: float = 1.0  # s, folded into the previous step's output as √s

    def sound(self, tol: float) -> bool:
        """Both reciprocals meet tol over their whole domains, which hold every row sum the
        exp's domain allows: then no row can push a Newton iteration out of its basin."""
        reciprocals = [self.recip] + ([self.square] if self.rounds else [])
        return all(r.max_error <= tol / 2**self.rounds for r in reciprocals)

    @property
    def half(self) -> float:
        """What x is divided by to become the exp's [−1, 1] coordinate (before centering)."""
        return self.exp.half * 2.0**self.rounds


def softmax(ar: Arith, masked: Arith, xs: Any, weights: Any, plan: SoftmaxPlan, axis: int) -> Any:
    """Softmax of x given xs = x/plan.half, centered on its row mean instead of its (unknowable) max.

    ``weights`` is keep/n_valid (plaintext); ``masked`` multiplies the exp coefficients by it.
    By Jensen, mean(exp(x − mean x)) ≥ 1, so the scaled row sum has a lower bound of s: the
    reciprocal's domain stays narrow. Centering costs one level (the weighted mean).
    """
    exp = plan.exp
    mean = ar.reduce_sum(ar.mul_plain(xs, weights), axis)
    t = ar.shift(ar.sub(xs, mean), -exp.mid / exp.half)
    e = exp.evaluate_t(masked, t)
    root = math.sqrt(plan.square_scale)
    y = normalize(ar, e, ar.reduce_sum(e, axis), plan.recip, k=root if plan.rounds else 1.0)
    for step in range(plan.rounds):
        squared = ar.mul(y, y)  # s·y², so Σ lands in the square reciprocal's domain
        last = step == plan.rounds - 1
        y = normalize(ar, squared, ar.reduce_sum(squared, axis), plan.square, k=1.0 if last else root)
    return y


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
