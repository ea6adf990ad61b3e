"""Polynomial approximations and the one evaluation scheme every backend shares.

An approximation is written once against a tiny arithmetic interface (:class:`Arith`): add,
ciphertext×ciphertext ``mul``, multiply by a plaintext scalar ``scale`` and add a constant
``shift``. Three interpreters run the same code: numpy (the error we report), level counting
(the depth we report) and ONNX emission (the graph ORT and the encrypted runtime execute), so
the numbers in the report describe exactly the nodes in the graph.

Chebyshev polynomials are evaluated in the Chebyshev basis by recursive division by the giant
steps T_2^i (T_2n = 2T_n² − 1; multiplying by the integer 2 is an addition, free): p = q + T_m·r
with q, r of degree < m, down to leaves c₀ + c₁t whose coefficient multiplication sits a level
below the giant step that multiplies it. A degree-d polynomial therefore costs ⌈log₂(d + 1)⌉
levels (degree 2^k − 1 in k), the optimum for scalar-coefficient evaluation, with about d/2
ciphertext products; parity zeroes half the coefficients (GELU = 0.5x + even part,
tanh/erf/sigmoid−½ odd).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any, Protocol

import numpy as np
from numpy.polynomial import chebyshev as cheb


class Arith(Protocol):
    def add(self, a: Any, b: Any) -> Any: ...
    def sub(self, a: Any, b: Any) -> Any: ...
    def mul(self, a: Any, b: Any) -> Any: ...
    def scale(self, a: Any, c: float) -> Any: ...
    def shift(self, a: Any, c: float) -> Any: ...


def is_integer(c: float) -> bool:
    """Multiplying by an integer is repeated addition in CKKS: it costs no level. Judged on the
    float32 constant the graph holds, as the depth report judges it."""
    c = float(np.float32(c))
    return c.is_integer() and abs(c) <= 8


class NumpyArith:
    """float64 evaluation: the reference for the error we report (``mask`` rides on coefficients)."""

    def __init__(self, mask: np.ndarray | None = None) -> None:
        self.mask = mask

    def coeff(self, a, c):
        return a * c if self.mask is None else a * (self.mask * c)

    def constant_term(self, a, c):
        return a + c if self.mask is None else a + self.mask * c

    def reduce_sum(self, a, axis):
        return np.sum(a, axis=axis, keepdims=True)

    def mul_plain(self, a, p):
        return a * p

    def add_plain(self, a, p):
        return a + p

    def power(self, a, p):
        return a**p

    def add(self, a, b):
        return a + b

    def sub(self, a, b):
        return a - b

    def mul(self, a, b):
        return a * b

    def scale(self, a, c):
        return a * c

    def shift(self, a, c):
        return a + c


class LevelArith:
    """Values are levels consumed: mul +1, scale by a non-integer +1, add/shift free.

    ``masked``: coefficients carry a plaintext mask (emitted as a plaintext tensor), so even an
    integer coefficient costs its level.
    """

    def __init__(self, masked: bool = False) -> None:
        self.ct_ct = 0
        self.ct_pt = 0
        self.masked = masked

    def coeff(self, a, c):
        return self.mul_plain(a, c) if self.masked else self.scale(a, c)

    def constant_term(self, a, c):
        return a

    def add(self, a, b):
        return max(a, b)

    sub = add

    def mul(self, a, b):
        self.ct_ct += 1
        return max(a, b) + 1

    def scale(self, a, c):
        if is_integer(c):
            return a
        self.ct_pt += 1
        return a + 1

    def shift(self, a, c):
        return a

    def reduce_sum(self, a, axis):
        return a  # rotations and additions

    def mul_plain(self, a, p):
        self.ct_pt += 1
        return a + 1

    def add_plain(self, a, p):
        return a

    def power(self, a, p):
        self.ct_ct += max(0, int(p).bit_length() - 1 + bin(int(p)).count("1") - 1)
        return a + max(0, math.ceil(math.log2(p)))


def chebyshev_sum(ar: Arith, t: Any, coeffs: np.ndarray, tiny: float = 0.0) -> Any:
    """Σ c_k T_k(t) at depth ⌈log₂(d + 1)⌉; terms with |c_k| ≤ tiny (parity zeros) are skipped."""
    coeffs = np.where(np.abs(coeffs) > tiny, np.asarray(coeffs, dtype=np.float64), 0.0)
    giant: dict[int, Any] = {1: t}
    value, constant = _split(ar, coeffs, giant)
    if value is None:
        raise ValueError("a polynomial without non-constant terms")
    add_constant = getattr(ar, "constant_term", ar.shift)
    return add_constant(value, constant) if constant else value


def _giant(ar: Arith, giant: dict[int, Any], m: int) -> Any:
    """T_m for m a power of two, at depth log₂ m: T_2m = 2T_m² − 1 (the 2 is an addition)."""
    if m not in giant:
        half = _giant(ar, giant, m // 2)
        giant[m] = ar.shift(ar.scale(ar.mul(half, half), 2.0), -1.0)
    return giant[m]


def _split(ar: Arith, c: np.ndarray, giant: dict[int, Any]) -> tuple[Any, float]:
    """(ciphertext part, constant) of Σ c_k T_k by recursive Chebyshev division p = q + T_m·r.

    m is the largest power of two ≤ deg p, so q and r have degree < m and, by induction, sit
    at depth ≤ log₂ m, the depth of T_m: the product lands at log₂ m + 1 = ⌈log₂(d + 1)⌉. The
    coefficient multiplications happen in the leaves (c₀ + c₁t), a level below the giant steps
    they are multiplied by, so they cost no extra level (Bossuat et al., Eurocrypt 2021).
    """
    nonzero = np.flatnonzero(c)
    if not nonzero.size or nonzero[-1] == 0:
        return None, float(c[0]) if c.size else 0.0
    d = int(nonzero[-1])
    coeff = getattr(ar, "coeff", ar.scale)
    if d == 1:
        return coeff(giant[1], float(c[1])), float(c[0])
    m = 1 << (d.bit_length() - 1)
    r = np.concatenate([[c[m]], 2.0 * c[m + 1 : d + 1]])  # T_m·T_k = (T_m+k + T_m−k)/2
    q = c[:m].copy()
    q[2 * m - d : m] -= c[d:m:-1]
    q_value, q_constant = _split(ar, q, giant)
    r_value, r_constant = _split(ar, r, giant)
    t_m = _giant(ar, giant, m)
    parts = [q_value] if q_value is not None else []
    if r_value is not None:
        parts.append(ar.mul(t_m, r_value))
    if r_constant:
        parts.append(coeff(t_m, r_constant))
    total = parts[0]
    for part in parts[1:]:
        total = ar.add(total, part)
    return total, q_constant


@dataclasses.dataclass
class Chebyshev:
    """p(x) ≈ f(x) on [lo, hi]: Chebyshev coefficients in t = (x − mid)/half."""

    name: str
    lo: float
    hi: float
    coeffs: np.ndarray
    max_error: float = float("nan")

    @property
    def degree(self) -> int:
        return len(self.coeffs) - 1

    @property
    def mid(self) -> float:
        return 0.5 * (self.lo + self.hi)

    @property
    def half(self) -> float:
        return 0.5 * (self.hi - self.lo)

    def evaluate_t(self, ar: Arith, t: Any) -> Any:
        return chebyshev_sum(ar, t, self.coeffs)

    def evaluate(self, ar: Arith, x: Any) -> Any:
        """From x: the affine map to t costs one level when it cannot be folded upstream."""
        return self.evaluate_t(ar, ar.scale(ar.shift(x, -self.mid), 1.0 / self.half))

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return self.evaluate(NumpyArith(), np.asarray(x, dtype=np.float64))

    def depth(self) -> int:
        """Levels above t (pre-scaling folded)."""
        return self.evaluate_t(LevelArith(), 0)


def grid(lo: float, hi: float, n: int = 4001) -> np.ndarray:
    return np.linspace(lo, hi, n)


def fit_chebyshev(
    name: str, fn: Callable[[np.ndarray], np.ndarray], lo: float, hi: float, degree: int, parity: str = ""
) -> Chebyshev:
    """Interpolate at Chebyshev points (near-minimax); ``parity`` even/odd zeroes the other terms."""
    mid, half = 0.5 * (lo + hi), 0.5 * (hi - lo)
    coeffs = cheb.chebinterpolate(lambda t: fn(mid + half * t), degree)
    if parity == "even":
        coeffs[1::2] = 0.0
    elif parity == "odd":
        coeffs[0::2] = 0.0
    approx = Chebyshev(name, lo, hi, coeffs)
    xs = grid(lo, hi)
    approx.max_error = float(np.max(np.abs(approx(xs) - fn(xs))))
    return approx


def fit_to_tolerance(
    name: str,
    fn: Callable[[np.ndarray], np.ndarray],
    lo: float,
    hi: float,
    tol: float,
    parity: str = "",
    max_degree: int = 63,
) -> Chebyshev:
    """The cheapest degree (by depth, then degree) whose max error on [lo, hi] is ≤ tol.

    Within one depth the highest degree is free, so we try the top degree of each depth
    (2^k − 1, and 2^k − 2 for even functions) and stop at the first that meets ``tol``; if
    none does, the most accurate one is returned and its error says so.
    """
    best = None
    for k in range(2 if parity == "even" else 1, max_degree.bit_length() + 1):
        degree = min((1 << k) - (2 if parity == "even" else 1), max_degree)
        candidate = fit_chebyshev(name, fn, lo, hi, degree, parity)
        if best is None or candidate.max_error < best.max_error:
            best = candidate
        if candidate.max_error <= tol:
            return _trim(candidate, fn, tol)
    return best


def _trim(approx: Chebyshev, fn, tol: float) -> Chebyshev:
    """Drop the top terms while the error stays within tol (same depth, fewer multiplications)."""
    xs = grid(approx.lo, approx.hi)
    depth = approx.depth()
    while approx.degree > 1:
        shorter = Chebyshev(approx.name, approx.lo, approx.hi, approx.coeffs[:-1].copy())
        if not np.any(shorter.coeffs[1:]) or shorter.depth() > depth:
            break
        shorter.max_error = float(np.max(np.abs(shorter(xs) - fn(xs))))
        if shorter.max_error > tol:
            break
        approx = shorter
    return approx
