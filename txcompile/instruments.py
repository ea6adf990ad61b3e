"""The checks around every pass, as instruments (after TVM's pass instruments).

The pass manager runs each pass on one IR clone of the last accepted model, serializes the
result once (its weights as references into the run's workspace) and hands that candidate to
every instrument in turn. An instrument may veto it
with a reason — the pass is then rolled back — and hears when a candidate is accepted, so
checks that compare against "the model before" keep their own state. Adding a check to every
pass is adding an instrument, not editing the manager.
"""

from __future__ import annotations

import numpy as np
import onnx

from txcompile.graph import ort as rt
from txcompile.graph import size, workspace
from txcompile.graph.errors import one_line


class Instrument:
    """A check on every pass's candidate; the default checks nothing."""

    def start(self, model: onnx.ModelProto) -> None:
        """The pipeline's input, before the first pass."""

    def after(self, candidate: onnx.ModelProto, exact: bool, record) -> str | None:
        """Why the candidate must be rolled back, or None; may fill the pass's record."""
        return None

    def accept(self) -> None:
        """The last candidate this instrument passed became the accepted model."""


class OnnxChecker(Instrument):
    """The ONNX checker; on the candidate's file in the workspace, where its weights are (in
    memory only a model under protobuf's 2 GiB could be checked)."""

    def after(self, candidate, exact, record):
        try:
            if (active := workspace.current()) is not None:
                onnx.checker.check_model(str(active.file(candidate)))
            elif size.fits_in_protobuf(candidate):
                onnx.checker.check_model(candidate)
        except Exception as err:
            return f"fails the ONNX checker: {one_line(err)}"
        return None


class NumericDrift(Instrument):
    """Load and run in onnxruntime on the device; an exact pass must stay within ``atol``."""

    def __init__(self, feeds: dict[str, np.ndarray], device: str, atol: float) -> None:
        self.feeds, self.device, self.atol = feeds, device, atol
        self.reference: dict[str, np.ndarray] | None = None  # the pipeline input's outputs
        self.outputs: dict[str, np.ndarray] | None = None  # the accepted model's outputs
        self._pending: dict[str, np.ndarray] | None = None

    def start(self, model):
        self.reference = self.outputs = rt.run(
            rt.create_session(model, self.device, prepack=False), self.feeds
        )

    def after(self, candidate, exact, record):
        try:
            self._pending = rt.run(rt.create_session(candidate, self.device, prepack=False), self.feeds)
        except Exception as err:
            return f"onnxruntime ({self.device}) cannot run it: {one_line(err)}"
        record.max_diff = rt.max_abs_diff(self.outputs, self._pending, rt.padded_rows(candidate, self.feeds))
        if exact and not record.max_diff <= self.atol:
            return f"exact pass drifted {record.max_diff:.3g} > atol {self.atol:g}"
        return None

    def accept(self):
        self.outputs = self._pending
