"""1/u and 1/√u on a bounded domain: a Chebyshev first guess refined by Newton steps.

Newton for 1/u, y ← y(2 − uy), squares the relative error at two levels a step; for 1/√u,
y ← 1.5y − (0.5uy)·y² (the same step, associated so that uy and y² are computed side by side),
also at two. ``plan_*`` searches first-guess degree × steps for the
smallest depth that meets the tolerance (relative error, the one that matters when the result
multiplies something), measured by running the exact scheme in float64.
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

    def evaluate(self, ar: Arith, u: Any, t: Any | None = None, k: float = 1.0) -> Any:
        """k·u^(-power). ``t`` is u already mapped to [−1, 1] when the caller folded the map.

        The output factor k rides on the first guess's coefficients and on the plaintext
        scalar Newton already multiplies u by, so it costs no level.
        """
        guess = Chebyshev(self.guess.name, self.lo, self.hi, self.guess.coeffs * k)
        y = guess.evaluate_t(ar, t) if t is not None else guess.evaluate(ar, u)
        if self.power == 1.0:
            u_k = ar.scale(u, -1.0 / k) if self.steps else None
            for _ in range(self.steps):
                y = ar.mul(y, ar.shift(ar.mul(u_k, y), 2.0))
        else:
            half_u = ar.scale(u, -0.5 / (k * k)) if self.steps else None
            for _ in range(self.steps):  # y(1.5 − 0.5uy²) as 1.5y − (0.5uy)(y²): uy and y² side by side
                y = ar.add(ar.scale(y, 1.5), ar.mul(ar.mul(half_u, y), ar.mul(y, y)))
        return y

    def __call__(self, u: np.ndarray) -> np.ndarray:
        return self.evaluate(NumpyArith(), np.asarray(u, dtype=np.float64))

    def depth(self, folded: bool = True) -> int:
        """Levels above u; the first guess sees t (folded map) or pays one level for it."""
        levels = LevelArith()
        return self.evaluate(levels, 0, t=0 if folded else None)

    @property
    def degree(self) -> int:
        return self.guess.degree


def _relative_error(fn: Callable[[np.ndarray], np.ndarray], target: Callable, lo: float, hi: float) -> float:
    xs = grid(lo, hi)
    exact = target(xs)
    return float(np.max(np.abs(fn(xs) - exact) / np.abs(exact)))


def plan_inverse(name: str, power: float, lo: float, hi: float, tol: float, max_depth: int = 16):
    """Smallest-depth (then fewest multiplications) first guess + Newton steps with error ≤ tol."""
    if not 0 < lo < hi:
        raise ValueError(f"{name}: domain [{lo:g}, {hi:g}] must be positive")

    def target(x):
        return x ** (-power)

    candidates = []
    for degree in (1, 2, 3, 4, 7, 8, 15, 16, 31, 32, 63, 64, 127):  # wide domains: a finer guess beats a step
        guess = fit_chebyshev(f"{name}-guess", target, lo, hi, degree)
        for steps in range(0, 6):
            candidate = NewtonInverse(name, power, guess, steps)
            depth = candidate.depth()
            if depth > max_depth:
                break
            candidate.max_error = _relative_error(candidate, target, lo, hi)
            candidates.append(((depth, degree + 4 * steps), candidate))
    good = [c for c in candidates if c[1].max_error <= tol]
    if good:
        return min(good, key=lambda c: c[0])[1]
    return min(candidates, key=lambda c: c[1].max_error)[1]
