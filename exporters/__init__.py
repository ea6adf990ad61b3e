"""torch → ONNX for txcompile: built-in demo models, local Hugging Face folders, user factories.

``load_model_spec`` turns what the user typed into a :class:`TorchModel`; ``export_onnx``
exports it (dynamo first, TorchScript as fallback) and checks it in ONNX Runtime.
"""

from .builtin import BUILTINS, DEFAULT_MODEL
from .model import TorchModel
from .spec import load_model_spec, spec_files
from .torch_export import SOURCE_KEY, ExportResult, export_onnx

__all__ = [
    "BUILTINS",
    "DEFAULT_MODEL",
    "SOURCE_KEY",
    "ExportResult",
    "TorchModel",
    "export_onnx",
    "load_model_spec",
    "spec_files",
]
