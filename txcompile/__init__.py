"""txcompile: compile PyTorch transformers into optimized, verified ONNX graphs."""

__version__ = "0.1.0"
