"""txcompile: compile PyTorch transformers into optimized, verified ONNX graphs."""

import importlib
import os

# onnxruntime records telemetry (a device id and an event queue under ~/.cache) when its
# environment starts, unless this is set before it is first imported: txcompile opts out.
os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")

__version__ = "0.1.0"


def __getattr__(name: str):
    """``txcompile.compile``, ``optimize``, ``load``, ``Compiled``, ``TxError``: imported on first
    use, so ``import txcompile`` stays light (no onnxruntime or torch until asked)."""
    # by name, not by import statement: the package root re-exports the top of the layers and is
    # itself in none (modules below, reading __version__, would otherwise seem to import api)
    if name in ("compile", "optimize", "load", "Compiled"):
        return getattr(importlib.import_module("txcompile.api"), name)
    if name in ("TxError", "VerificationError"):
        return getattr(importlib.import_module("txcompile.graph.errors"), name)
    raise AttributeError(f"module 'txcompile' has no attribute {name!r}")


__all__ = ["Compiled", "TxError", "VerificationError", "compile", "load", "optimize"]
