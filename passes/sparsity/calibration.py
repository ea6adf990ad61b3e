"""Calibration for activation-aware pruning: how large each input feature of each layer gets.

Wanda (Sun et al., 2023) scores a weight by |W_ij| * ||x_i||, where ||x_i|| is the L2 norm of
input feature i over every calibration token. The norms come from one ORT run of the model with
each linear layer's input exposed as an extra output.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir

from txcompile.errors import TxError
from txcompile.runtime import inputs as model_inputs
from txcompile.runtime import session as rt

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
    proto = ir.serde.serialize_model(model)
    wanted = {}
    for linear in linears:
        wanted.setdefault(linear.node.inputs[0].name, []).append(linear)
    existing = {o.name for o in proto.graph.output}
    for name in wanted:
        if name not in existing:
            proto.graph.output.append(onnx.ValueInfoProto(name=name))
    session = rt.create_session(proto, optimize=False)
    names = [o.name for o in session.get_outputs()]
    values = dict(zip(names, session.run(None, _usable(session, feeds)), strict=True))
    norms = {}
    for name, users in wanted.items():
        activation = np.asarray(values[name], dtype=np.float64)
        for linear in users:
            k = linear.shape[0]
            flat = activation.reshape(-1, k)
            norms[linear.name] = np.sqrt((flat**2).sum(axis=0))
    return norms


def _usable(session, feeds: dict) -> dict:
    wanted = {i.name for i in session.get_inputs()}
    return {k: v for k, v in feeds.items() if k in wanted}
