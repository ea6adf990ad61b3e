"""fuse-norms: decomposed LayerNorm / RMSNorm → one norm op; with the residual Add → a Skip norm.

The rules run in this order, each over the whole graph: ``no-op-cast`` (decomposed.py) clears
the Casts TorchScript writes inside RMSNorms, ``layer-norm`` / ``rms-norm`` (decomposed.py)
fuse the decomposed norms, ``skip-layer-norm`` / ``skip-rms-norm`` (skip.py) take the residual
Add in. Every site lands in ``details["sites"]``: fused with its op, or unfused with the reason.
"""

from __future__ import annotations

import onnx_ir as ir

from txcompile.graph.shapes import infer_shapes
from txcompile.passes.norms.decomposed import LayerNorm, NoOpCast, RmsNorm
from txcompile.passes.norms.skip import SkipLayerNorm, SkipRmsNorm
from txcompile.passes.norms.state import NormState
from txcompile.passes.rules import RulePass


class FuseNorms(RulePass):
    name = "fuse-norms"
    summary = (
        "decomposed LayerNorm/RMSNorm → one op; residual Add + norm → Skip(Simplified)LayerNormalization"
    )
    rules = (NoOpCast, LayerNorm, RmsNorm, SkipLayerNorm, SkipRmsNorm)

    def prepare(self, model: ir.Model) -> NormState:
        infer_shapes(model)
        return NormState(model)

    def finish(self, model, state: NormState, records) -> None:
        super().finish(model, state, records)
        self.details.update(state.notes)
