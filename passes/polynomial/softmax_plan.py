"""Planning the approximate softmax: how many normalize-and-square rounds, which reciprocals.

Pure numpy on the calibrated scores (no graph): every candidate plan is scored by its error on
the calibration rows and its depth, and the shallowest sound one meeting the tolerance wins.
"""

from __future__ import annotations

import functools
import math

import numpy as np

from txcompile.graph.errors import TxError

from . import calibrate, composite
from .approx import LevelArith, NumpyArith, fit_to_tolerance
from .inverse import plan_inverse
from .masks import MASKED, softmax_exact
from .state import max_error

MAX_SQUARINGS = 6  # softmax normalize-and-square rounds tried
COARSE = (0.03, 0.1, 0.2)  # relative errors tried for the reciprocals before a squaring
SUM_SLACK = 1.05  # room for the exp's own error at the edges of the row-sum bounds
MAX_EXPONENT = 600.0  # exp beyond this overflows float64 planning (e^709 is the limit)


def plan_softmax(centered, n: int, calib, axis: int, tol: float, margin: float):
    """The shallowest sound plan (normalize-and-square rounds × the coarse error of the
    reciprocals before the last) meeting tol on the calibration rows, else the most
    accurate one; returns (plan, its error on the calibration rows).

    Each round halves the range the exp must cover, and so shrinks exponentially the range
    of row sums its reciprocal must invert, at the price of one squaring and one reciprocal
    of fixed domain.
    """
    candidates = []
    for rounds in range(MAX_SQUARINGS + 1):
        for coarse in COARSE if rounds else (0.0,):
            plan = softmax_plan(centered, n, rounds, coarse, tol, margin)
            if plan is None:  # the row sums overflow: more rounds needed
                break
            error = max(max_error(softmax_exact(a), softmax_numpy(a, plan, axis)) for a in calib)
            depth = composite.softmax(LevelArith(), LevelArith(masked=True), 0, 0, plan, axis)
            candidates.append((depth, error, plan))
    if not candidates:
        raise TxError(f"softmax scores span more than 2^{MAX_SQUARINGS} × {MAX_EXPONENT:g} units")
    good = [c for c in candidates if c[1] <= tol and c[2].sound(tol)]
    _, error, plan = min(good, key=lambda c: c[0]) if good else min(candidates, key=lambda c: c[1])
    return plan, error


def softmax_plan(centered, n: int, rounds: int, coarse: float, tol: float, margin: float):
    """The plan with ``rounds`` squarings, or None when the exp's domain would overflow."""
    exp_tol = tol / 2**rounds  # each squaring doubles the exp's relative error
    squeezed = [c / 2**rounds for c in centered]
    domain = calibrate.domain_of([c[np.isfinite(c)] for c in squeezed], margin)
    if domain.hi > MAX_EXPONENT:
        return None
    low, high = 1.0 / SUM_SLACK, mean_exp_bound(domain.lo, domain.hi) * SUM_SLACK
    s = 2.0 / (high - low)
    recip = reciprocal("softmax-reciprocal", s * low, coarse or tol)

    def target(v):
        return s * np.exp(v)

    exp = fit_to_tolerance("exp", target, domain.lo, domain.hi, exp_tol * s)
    if not rounds:
        return composite.SoftmaxPlan(exp, recip)
    # Σy² of a probability row lies in [1/n_valid, 1]; the coarse reciprocal before widens it
    lo, hi = (1.0 - coarse) ** 2 / (n * SUM_SLACK), (1.0 + coarse) ** 2 * SUM_SLACK
    q = 2.0 / (hi - lo)
    square = reciprocal("softmax-square-reciprocal", q * lo, coarse) if rounds > 1 else None
    last = reciprocal("softmax-square-reciprocal", q * lo, tol / 2)
    return composite.SoftmaxPlan(exp, recip, rounds, square, last, q, coarse)


@functools.lru_cache(maxsize=256)
def reciprocal(name: str, lo: float, tol: float):
    """1/u on [lo, lo + 2] times a factor at u's level (softmax plans share them across rounds)."""
    return plan_inverse(name, 1.0, lo, lo + 2.0, tol, factor=True)


def softmax_numpy(a: np.ndarray, plan: composite.SoftmaxPlan, axis: int) -> np.ndarray:
    """The plan run in float64 on calibrated scores (masked entries dropped as the graph does)."""
    keep = (a > MASKED).astype(np.float64)
    weights = keep / np.maximum(keep.sum(-1, keepdims=True), 1.0)
    xs = np.where(keep > 0, a, 0.0) / plan.half
    mean = (xs * weights).sum(-1, keepdims=True)
    return composite.softmax(NumpyArith(), NumpyArith(weights), xs, mean, plan, axis)


def centered(a: np.ndarray) -> np.ndarray:
    """Each row minus its mean over allowed entries; masked entries become NaN."""
    keep = a > MASKED
    mean = np.where(keep, a, 0.0).sum(-1, keepdims=True) / np.maximum(keep.sum(-1, keepdims=True), 1)
    return np.where(keep, a - mean, np.nan)


def mean_exp_bound(lo: float, hi: float) -> float:
    """The largest mean(exp(c)) over rows with mean(c) = 0 and every c in [lo, hi].

    exp is convex, so the worst row puts all its mass on lo and hi (in the proportion that
    keeps the mean at 0); Jensen gives the lower bound, 1. Any row the exp's domain covers has
    its sum in [1, this]: the reciprocal planned on it cannot be pushed past its domain.
    """
    if not lo < 0 < hi:
        return math.exp(max(hi, 0.0))
    return (-lo * math.exp(hi) + hi * math.exp(lo)) / (hi - lo)
