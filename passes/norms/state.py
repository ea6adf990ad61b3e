"""What the norm rules of one pass run read once: the model, the decomposed norms, report notes."""

from __future__ import annotations

import onnx_ir as ir

from txcompile.passes.norms import match as norm_match


class NormState:
    """Shared by a pass's rules; the decomposed norms are found once, when a rule first asks."""

    def __init__(self, model: ir.Model, device: str = "cpu") -> None:
        self.model, self.device = model, device
        self.notes: dict[str, str] = {}  # summary facts for details (e.g. "opset")
        self._decomposed: tuple[list, list] | None = None

    def note_opset(self, note: str | None) -> None:
        """Every opset change lands in the report, in order (14 → 17 for LayerNorm, then 17 → 23)."""
        if note:
            self.notes["opset"] = f"{self.notes['opset']}; {note}" if "opset" in self.notes else note

    def decomposed(self) -> tuple[list[norm_match.Decomposed], list[norm_match.Mismatch]]:
        if self._decomposed is None:
            self._decomposed = norm_match.find(self.model.graph)
        return self._decomposed
