"""Range calibration: run ORT with chosen intermediate values exposed and keep what they held.

The pass needs more than min/max: the softmax denominator's range depends on each row's
values, the LayerNorm variance on each row's spread. So calibration returns the arrays (the
calibration set is small by design) and the helpers below turn them into domains.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping

import numpy as np
import onnx_ir as ir

from txcompile.graph.probe import probe_runs


def capture(model: ir.Model, names: Iterable[str], feeds_list: list[Mapping[str, np.ndarray]]):
    """Values by name for each feed set: ``{name: [array per feed set]}``, in float64."""
    found = probe_runs(model, names, feeds_list)
    return {name: [np.asarray(v, dtype=np.float64) for v in values] for name, values in found.items()}


@dataclasses.dataclass(frozen=True)
class Domain:
    """Observed range [low, high] and the approximation domain: the range widened by ``margin``."""

    low: float
    high: float
    margin: float

    @property
    def lo(self) -> float:
        mid, half = 0.5 * (self.low + self.high), 0.5 * (self.high - self.low)
        return mid - self.margin * max(half, 1e-6)

    @property
    def hi(self) -> float:
        mid, half = 0.5 * (self.low + self.high), 0.5 * (self.high - self.low)
        return mid + self.margin * max(half, 1e-6)

    def to_json(self) -> dict:
        return {"observed": [self.low, self.high], "domain": [self.lo, self.hi], "margin": self.margin}


def domain_of(arrays: Iterable[np.ndarray], margin: float) -> Domain:
    values = np.concatenate([np.ravel(a) for a in arrays])
    values = values[np.isfinite(values)]
    return Domain(float(values.min()), float(values.max()), margin)


def positive_domain(values: np.ndarray, margin: float) -> Domain:
    """For 1/u and 1/√u: widen multiplicatively so the domain stays positive."""
    values = values[np.isfinite(values)]
    low, high = float(values.min()), float(values.max())
    return Domain(low / margin, high * margin, 1.0)


def out_of_range_rate(arrays: Iterable[np.ndarray], lo: float, hi: float) -> float:
    values = np.concatenate([np.ravel(a) for a in arrays])
    values = values[np.isfinite(values)]
    if values.size == 0:
        return 0.0
    return float(np.mean((values < lo) | (values > hi)))
