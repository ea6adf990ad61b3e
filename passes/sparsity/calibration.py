"""Calibration for activation-aware pruning: how large each input feature of each layer gets.

Wanda (Sun et al., 2023) scores a weight by |W_ij| * ||x_i||, where ||x_i|| is the L2 norm of
input feature i over every calibration token. The norms come from one ORT run of the model with
each linear layer's input exposed as an extra output (attention_shapes.probe_values).
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir

from txcompile.graph import inputs as model_inputs
from txcompile.graph.errors import TxError
from txcompile.graph.probe import probe_values

from .linears import Linear


def calibration_feeds(proto: onnx.ModelProto, path: str | None, fallback: dict) -> tuple[dict, str]:
    """Feeds from ``--calib x.npz`` when given, else the verification inputs."""
    if path:
        return model_inputs.load_npz(path, model_inputs.read_specs(proto)), path
    if not fallback:
        raise TxError("--prune-score activation needs calibration inputs (--calib x.npz)")
    return fallback, "the verification inputs"


def input_norms(model: ir.Model, linears: list[Linear], feeds: dict) -> dict[str, np.ndarray]:
    """Per linear (by weight name), the L2 norm of each of its K input features: [K]."""
    values = probe_values(model, [linear.node.inputs[0] for linear in linears], feeds)
    norms = {}
    for linear in linears:
        flat = np.asarray(values[linear.node.inputs[0].name], dtype=np.float64).reshape(-1, linear.shape[0])
        norms[linear.name] = np.sqrt((flat**2).sum(axis=0))
    return norms
