"""A PyTorch model ready to export: the module plus what its inputs mean.

Every source (built-in, Hugging Face folder, ``file.py:factory``) ends up as a
:class:`TorchModel`, so the exporter never needs to know where a model came from. The
:class:`InputSpec` list is the same one written into the ONNX metadata, so verification after
export draws the same kind of inputs (token ids in range, masks with padding) as PyTorch saw.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import torch

from txcompile.graph.inputs import InputSpec, make_feeds


@dataclasses.dataclass
class TorchModel:
    """A module in eval mode whose ``forward`` takes ``inputs`` positionally, in order.

    ``inputs`` use the symbolic dims "batch" and "seq" where a size is dynamic (other names,
    e.g. "decoder_seq", are allowed and fall back to "seq" when not given in ``dims``).
    ``dims`` are the default sizes of those dims for example inputs. ``warnings`` are things
    the user should know about the model itself (e.g. random weights). ``metadata`` goes into the
    exported graph's metadata_props (the task, labels and tokenizer of a Hugging Face folder).
    """

    module: torch.nn.Module
    inputs: list[InputSpec]
    output_names: list[str]
    source: str
    dims: dict[str, int] = dataclasses.field(default_factory=lambda: {"batch": 2, "seq": 16})
    warnings: list[str] = dataclasses.field(default_factory=list)
    metadata: dict[str, str] = dataclasses.field(default_factory=dict)  # written into the graph
    window: int | None = None  # the sliding window it attends with: verification should pass it

    @property
    def input_names(self) -> list[str]:
        return [spec.name for spec in self.inputs]

    def resolved_dims(self, dims: Mapping[str, int] | None = None) -> dict[str, int]:
        """The model's default dims overridden by ``dims``."""
        return {**self.dims, **(dims or {})}

    def example_inputs(self, dims: Mapping[str, int] | None = None, seed: int = 0) -> dict[str, torch.Tensor]:
        """Inputs by name drawn from the specs (masks pad the end of every row but the first)."""
        feeds = make_feeds(self.inputs, self.resolved_dims(dims), seed)
        return {name: torch.from_numpy(value) for name, value in feeds.items()}

    def example_args(self, dims: Mapping[str, int] | None = None, seed: int = 0) -> tuple:
        """The example inputs as the positional tuple ``forward`` takes."""
        feeds = self.example_inputs(dims, seed)
        return tuple(feeds[name] for name in self.input_names)


def flatten_outputs(outputs) -> list[torch.Tensor]:
    """Tensors of a forward's result in order: a tensor, nested tuples/lists, or a dict."""
    if isinstance(outputs, torch.Tensor):
        return [outputs]
    if isinstance(outputs, Mapping):
        outputs = list(outputs.values())
    if isinstance(outputs, list | tuple):
        return [t for item in outputs if item is not None for t in flatten_outputs(item)]
    return []
