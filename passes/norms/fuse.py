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
from txcompile.passes.norms.opset import RMS_NORM_OPSET, convert_opset, needs_conversion
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
        state = NormState(model, self.context.device)
        if needs_conversion(model, RMS_NORM_OPSET) and self._lone_rms_norms(model):
            note = convert_opset(model, RMS_NORM_OPSET)
            if note:  # the graph was replaced
                infer_shapes(model)
                state = NormState(model, self.context.device)
                state.note_opset(note)
        return state

    @staticmethod
    def _lone_rms_norms(model: ir.Model) -> bool:
        """Whether an RMSNorm will not become a Skip norm, so it needs RMSNormalization (opset 23).

        A look ahead only: the rules find the norms again once no-op-cast has run."""
        rms, (found, _) = RmsNorm(), NormState(model).decomposed()
        return any(site.kind == rms.kind and not rms.fuse_anyway(site) for site in found)

    def finish(self, model, state: NormState, records) -> None:
        super().finish(model, state, records)
        self.details.update(state.notes)
