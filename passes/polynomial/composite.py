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
    """k · numerator / total with total already scaled into the reciprocal's [mid − 1, mid + 1].

    The numerator sits at the total's level, below the first guess: it joins the last Newton
    step (no level of its own), or multiplies a guess without steps (one level)."""
    return recip.evaluate(ar, total, t=ar.shift(total, -recip.guess.mid), k=k, factor=numerator)


@dataclasses.dataclass
class SoftmaxPlan:
    """exp on x/2^rounds, its row-sum reciprocal, then ``rounds`` normalize-and-square steps.

    softmax(2z) = softmax(z)² / Σ softmax(z)²: a row spanning R units of scores costs one exp
    on R/2^rounds plus ``rounds`` squarings, each renormalized by a reciprocal whose domain is
    fixed by the math, Σy² ∈ [1/n, 1], however wide the scores were. Squaring then dividing by
    the sum of squares is blind to a per-row factor: a reciprocal before a squaring that is off
    by (1 + ε) leaves the next round's result exact and only widens the next domain to
    (1 ± ε)²·[1/n, 1]. So every reciprocal but the last needs only relative error ``coarse``;
    the last meets tol/2.
    """

    exp: Chebyshev
    recip: NewtonInverse  # 1/(s·mean exp): to tol without rounds, to ``coarse`` with
    rounds: int = 0
    square: NewtonInverse | None = None  # the rounds before the last: 1/(q·Σy²) to ``coarse``
    last: NewtonInverse | None = None  # the last round's, on the same domain, to tol/2
    square_scale: float = 1.0  # q, folded into the previous step's output as √q
    coarse: float = 0.0

    def sound(self, tol: float) -> bool:
        """Each reciprocal meets its error bound over its whole domain, which holds every row
        sum the exp's domain and the previous reciprocal's bound allow: then no row can push
        a Newton iteration out of its basin."""
        if not self.rounds:
            return self.recip.max_error <= tol
        coarse = [self.recip] + ([self.square] if self.rounds > 1 else [])
        return all(r.max_error <= self.coarse for r in coarse) and self.last.max_error <= tol / 2

    @property
    def half(self) -> float:
        """What x is divided by to become the exp's [−1, 1] coordinate (before centering)."""
        return self.exp.half * 2.0**self.rounds


def softmax(ar: Arith, masked: Arith, xs: Any, mean: Any, plan: SoftmaxPlan, axis: int) -> Any:
    """Softmax of x given xs = x/plan.half, centered on its row mean instead of its (unknowable) max.

    ``mean`` is Σ (keep/n_valid)·xs over the row: without a mask, the row sum of x/(n·half)
    folded into the producer beside xs (or one multiply in parallel), so centering costs no
    level; with one, xs times the plaintext weights, one level. ``masked`` multiplies the exp
    coefficients by keep/n_valid. By Jensen, mean(exp(x − mean x)) ≥ 1, so the scaled row sum
    has a lower bound of s: the reciprocal's domain stays narrow.
    """
    exp = plan.exp
    t = ar.shift(ar.sub(xs, mean), -exp.mid / exp.half)
    e = exp.evaluate_t(masked, t)
    root = math.sqrt(plan.square_scale)
    y = normalize(ar, e, ar.reduce_sum(e, axis), plan.recip, k=root if plan.rounds else 1.0)
    for step in range(plan.rounds):
        squared = ar.mul(y, y)  # q·y², so Σ lands in the square reciprocal's domain
        last = step == plan.rounds - 1
        recip = plan.last if last else plan.square
        y = normalize(ar, squared, ar.reduce_sum(squared, axis), recip, k=1.0 if last else root)
    return y


def power_softmax(ar: Arith, x: Any, p: int, offset: float, recip: NewtonInverse, axis: int) -> Any:
    """x^p / (offset + Σ x^p): Power-Softmax, x pre-scaled so the sum lands in the reciprocal's domain."""
    powered = ar.power(x, p)
    return normalize(ar, powered, ar.shift(ar.reduce_sum(powered, axis), offset), recip)


def layernorm(
    ar: Arith,
    x: Any,
    n: int,
    s: float,
    eps: float,
    isqrt: NewtonInverse,
    gamma_root_n,
    beta,
    axis: int,
    copies: tuple[Any, Any] | None = None,
) -> Any:
    """(x − mean)/√(var + eps)·γ + β with the variance pre-scaled by s (folded into the centering).

    d' = √s·(x − mean) costs one level (the 1/n of the mean rides on it) — none when
    ``copies`` = (√s·x, √s·mean x) were folded into the producer —, Σd'² one more,
    1/√(Σd'² + s·n·eps) the Newton depth, and (d'·γ√n)·y joins the last Newton step (or costs
    one level after a guess without steps). ``gamma_root_n`` is γ·√n (the √n undoes the
    pre-scaled variance).
    """
    if copies is None:
        root = math.sqrt(s)
        d = ar.sub(ar.scale(x, root), ar.scale(ar.reduce_sum(x, axis), root / n))
    else:
        d = ar.sub(*copies)
    total = ar.shift(ar.reduce_sum(ar.mul(d, d), axis), s * n * eps)
    factor = ar.mul_plain(d, gamma_root_n)
    out = isqrt.evaluate(ar, total, t=ar.shift(total, -isqrt.guess.mid), factor=factor)
    return out if beta is None else ar.add_plain(out, beta)
