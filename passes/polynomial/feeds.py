"""The two feed sets the polynomial pass needs: one to calibrate ranges, one to test them."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from txcompile.graph import inputs as model_inputs
from txcompile.graph import workspace
from txcompile.graph.errors import TxError


def feed_sets(model: ir.Model, feeds: dict[str, np.ndarray], calib_path: str | None):
    """Calibration and held-out feed sets: ``--calib`` then the verification inputs, or the
    verification inputs then fresh random ones drawn the same way."""
    if not feeds:
        raise TxError("he-polynomial needs verification inputs to calibrate on")
    if calib_path:
        proto = workspace.serialize(model)
        specs = model_inputs.read_specs(proto)
        return _chunks(model, model_inputs.load_npz(calib_path, specs)), [feeds]
    proto = workspace.serialize(model)
    specs = model_inputs.read_specs(proto)
    first = next(iter(feeds.values()))
    dims = {"batch": first.shape[0]}
    if first.ndim >= 2:
        dims["seq"] = first.shape[1]
    return [feeds], [model_inputs.make_feeds(specs, dims, seed=1)]


def _chunks(model: ir.Model, feeds: dict[str, np.ndarray]) -> list[dict[str, np.ndarray]]:
    """A calibration file may hold k × the static batch of a static-shape model: split it."""
    batch = None
    for value in model.graph.inputs:
        if value.shape is not None and len(value.shape) and isinstance(value.shape[0], int):
            batch = value.shape[0]
            break
    total = next(iter(feeds.values())).shape[0]
    if batch is None or total == batch:
        return [feeds]
    if total % batch:
        raise TxError(f"--calib holds {total} samples: a multiple of the model's batch {batch} is needed")
    return [{k: v[i : i + batch] for k, v in feeds.items()} for i in range(0, total, batch)]
