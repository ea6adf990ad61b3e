"""1/u and 1/√u on a bounded domain: a Chebyshev first guess refined by Newton steps.

Newton for 1/u, y ← y(2 − uy), squares the relative error e = 1 − uy each step. Written as
Goldschmidt does, y_k = y·(1 + e)(1 + e²)…(1 + e^(2^(k−1))) — the same numbers — the powers of
e come one level apart instead of two, so k steps cost k + 1 levels. For 1/√u,
y ← 1.5y − (0.5uy)·y² (associated so that uy and y² are computed side by side) costs two.
A result that multiplies something (softmax's exp, LayerNorm's centered input) takes the
factor F inside the last step — F·y formed beside the error term — so the product costs no
level of its own when the scheme has a step. ``plan_*`` searches first-guess degree × steps
for the smallest depth that meets the tolerance (relative error, the one that matters when
the result multiplies something), measured by running the exact scheme in float64.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import numpy as np

from .approx import Arith, Chebyshev, LevelArith, NumpyArith, fit_chebyshev, grid


@dataclasses.dataclass
class NewtonInverse:
    """y ≈ u^(-power) on [lo, hi], power 1 (reciprocal) or 0.5 (inverse square root)."""

    name: str
    power: float
    guess: Chebyshev
    steps: int
    max_error: float = float("nan")  # relative

    @property
    def lo(self) -> float:
        return self.guess.lo

    @property
    def hi(self) -> float:
        return self.guess.hi

    def evaluate(self, ar: Arith, u: Any, t: Any | None = None, k: float = 1.0, factor: Any = None) -> Any:
        """factor·k·u^(-power). ``t`` is u already mapped to [−1, 1] when the caller folded the map.

        The output factor k rides on the first guess's coefficients and on the plaintext
        scalar Newton already multiplies u by, so it costs no level; ``factor`` (a ciphertext
        no deeper than u) joins inside the last Newton step.
        """
        guess = Chebyshev(self.guess.name, self.lo, self.hi, self.guess.coeffs * k)
        y = guess.evaluate_t(ar, t) if t is not None else guess.evaluate(ar, u)
        if not self.steps:
            return y if factor is None else ar.mul(factor, y)
        if self.power == 1.0:
            return _goldschmidt(ar, u, y, self.steps, k, factor)
        return _newton_isqrt(ar, u, y, self.steps, k, factor)

    def __call__(self, u: np.ndarray) -> np.ndarray:
        return self.evaluate(NumpyArith(), np.asarray(u, dtype=np.float64))

    def depth(self, folded: bool = True, factor: bool = False) -> int:
        """Levels above u; the first guess sees t (folded map) or pays one level for it.
        ``factor``: of F·u^(-power), F at u's level."""
        levels = LevelArith()
        return self.evaluate(levels, 0, t=0 if folded else None, factor=0 if factor else None)

    @property
    def degree(self) -> int:
        return self.guess.degree


def _goldschmidt(ar: Arith, u: Any, y: Any, steps: int, k: float, factor: Any) -> Any:
    """Newton for 1/u as y·Π(1 + e^(2^i)), e = 1 − uy/k: e² is squared from e, not recomputed
    from the new y, so step i's factor is ready one level after step i − 1's."""
    error = ar.shift(ar.mul(ar.scale(u, -1.0 / k), y), 1.0)
    out = y if factor is None else ar.mul(factor, y)
    for step in range(steps):
        out = ar.mul(out, ar.shift(error, 1.0))
        if step < steps - 1:
            error = ar.mul(error, error)
    return out


def _newton_isqrt(ar: Arith, u: Any, y: Any, steps: int, k: float, factor: Any) -> Any:
    """y(1.5 − 0.5uy²/k²) as 1.5y − (0.5uy)(y²); the last step as 1.5(Fy) − (0.5uF·y)(y²)."""
    half_u = ar.scale(u, -0.5 / (k * k))
    for _ in range(steps - 1):
        y = ar.add(ar.scale(y, 1.5), ar.mul(ar.mul(half_u, y), ar.mul(y, y)))
    if factor is None:
        return ar.add(ar.scale(y, 1.5), ar.mul(ar.mul(half_u, y), ar.mul(y, y)))
    head = ar.mul(ar.mul(half_u, factor), y)
    return ar.add(ar.scale(ar.mul(factor, y), 1.5), ar.mul(head, ar.mul(y, y)))


def _relative_error(candidate: NewtonInverse, target: Callable, lo: float, hi: float, factor: bool) -> float:
    """Max relative error on [lo, hi] of the scheme as emitted (with a factor: F = 1 inside it)."""
    xs = grid(lo, hi)
    exact = target(xs)
    got = candidate.evaluate(NumpyArith(), xs, factor=np.ones_like(xs) if factor else None)
    return float(np.max(np.abs(got - exact) / np.abs(exact)))


def plan_inverse(
    name: str, power: float, lo: float, hi: float, tol: float, max_depth: int = 16, factor: bool = False
):
    """Smallest-depth (then fewest multiplications) first guess + Newton steps with error ≤ tol.

    ``factor``: the result multiplies a ciphertext at u's level, so depth and error are those
    of F·u^(-power) (F = 1 for the error: the same operations, F inside the last step).
    """
    if not 0 < lo < hi:
        raise ValueError(f"{name}: domain [{lo:g}, {hi:g}] must be positive")

    def target(x):
        return x ** (-power)

    candidates = []
    for degree in (1, 2, 3, 4, 7, 8, 15, 16, 31, 32, 63, 64, 127):  # wide domains: a finer guess beats a step
        guess = fit_chebyshev(f"{name}-guess", target, lo, hi, degree)
        for steps in range(0, 6):
            candidate = NewtonInverse(name, power, guess, steps)
            depth = candidate.depth(factor=factor)
            if depth > max_depth:
                break
            candidate.max_error = _relative_error(candidate, target, lo, hi, factor)
            candidates.append(((depth, degree + 4 * steps), candidate))
    good = [c for c in candidates if c[1].max_error <= tol]
    if good:
        return min(good, key=lambda c: c[0])[1]
    return min(candidates, key=lambda c: c[1].max_error)[1]
