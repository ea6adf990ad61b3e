"""txcompile: compile PyTorch transformers into optimized, verified ONNX graphs."""

import os

# onnxruntime records telemetry (a device id and an event queue under ~/.cache) when its
# environment starts, unless this is set before it is first imported: txcompile opts out.
os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")

__version__ = "0.1.0"
