"""Shapes for the norm passes: which axis is hidden, whether a residual Add broadcasts.

Exporters do not always record intermediate shapes; ONNX shape inference fills them in.
"""

from __future__ import annotations

import onnx_ir as ir
import onnx_ir.passes.common as common


def infer_shapes(model: ir.Model) -> None:
    """Best effort: unknown shapes only mean fewer sites qualify, never a wrong rewrite."""
    try:
        common.ShapeInferencePass()(model)
    except Exception:  # noqa: BLE001 - inference failing on exotic graphs must not stop the pass
        pass
