"""What the user typed → a TorchModel: a built-in name, a local HF folder, or ``file.py:factory``.

``file.py:factory`` imports the file by path and calls ``factory()``, which returns
``(module, example_inputs)``; the inputs' meaning is inferred from names and dtypes (an
integer "mask" is a padding mask, "position" positions, other integers token ids). Every
failure is a TxError with one line that names the spec and the cause.
"""

from __future__ import annotations

import contextlib
import importlib.util
import itertools
import os
import re
import sys
from collections.abc import Iterator, Mapping
from pathlib import Path

import torch

from txcompile.graph.errors import TxError
from txcompile.graph.inputs import InputSpec

from . import tasks
from .builtin import BUILTIN_TASKS, BUILTINS
from .huggingface import load_hf_folder
from .model import TorchModel, flatten_outputs
from .quiet import one_line

_FACTORY = re.compile(r"^(?P<path>.+\.py):(?P<name>[A-Za-z_][A-Za-z0-9_]*)$")


def load_model_spec(
    spec: str, *, task: str | None = None, attn_implementation: str | None = None
) -> TorchModel:
    """Resolve ``spec``: built-in name, folder with config.json, or ``path/to/file.py:factory``.
    ``task`` (a Hugging Face folder's) picks the head and outputs; inferred when None."""
    spec = str(spec).strip()
    if not spec:
        raise TxError("empty model spec: give a built-in name, a folder or file.py:factory")
    if (spec, task) in BUILTIN_TASKS:
        return BUILTINS[BUILTIN_TASKS[spec, task]][0]()
    if task is not None and tasks.task_named(task) and not Path(spec).is_dir():
        raise TxError(
            f"{spec}: --task applies to a Hugging Face model folder; a factory returns its own outputs"
        )
    if spec in BUILTINS:
        return BUILTINS[spec][0]()
    if spec.lower().endswith(".onnx"):
        raise TxError(f"{spec}: already an ONNX model; use `txcompile optimize {spec}` instead")
    match = _FACTORY.match(spec)
    if match:
        return _load_factory(spec, Path(match["path"]), match["name"])
    if spec.endswith(".py") or (":" in spec and spec.split(":", 1)[0].endswith(".py")):
        raise TxError(f"{spec}: name the factory to call, as file.py:factory")
    path = Path(spec)
    if path.is_dir():
        return load_hf_folder(path, task=task, attn_implementation=attn_implementation, source=spec)
    if path.exists():
        raise TxError(f"{spec}: not a model folder, .py:factory or built-in name")
    names = ", ".join(BUILTINS)
    if "/" in spec or "\\" in spec or spec.startswith("."):
        raise TxError(f"{spec}: no such folder (models are never downloaded; built-ins: {names})")
    raise TxError(f"{spec}: unknown model (built-ins: {names}; or a local folder, or file.py:factory)")


def spec_files(spec: str) -> list[Path]:
    """The files loading ``spec`` reads: the factory's .py, or every file of a model folder
    (so that no output may replace them)."""
    spec = str(spec).strip()
    match = _FACTORY.match(spec)
    if match:
        return [Path(match["path"])]
    path = Path(spec)
    if spec not in BUILTINS and path.is_dir():
        return [p for p in itertools.islice(path.rglob("*"), 100_000) if p.is_file()]
    return []


def _load_factory(spec: str, path: Path, name: str) -> TorchModel:
    if not path.is_file():
        raise TxError(f"{spec}: file {path} not found")
    module_name = f"txcompile_user_{abs(hash(path.resolve()))}"
    # like `python file.py`: the file's folder is importable while it loads and builds
    with _on_sys_path(path.resolve().parent), _exit_raises():
        try:
            loader_spec = importlib.util.spec_from_file_location(module_name, path)
            module = importlib.util.module_from_spec(loader_spec)
            sys.modules[module_name] = module
            loader_spec.loader.exec_module(module)
        except KeyboardInterrupt:
            raise
        except BaseException as err:  # the user's code may raise anything, SystemExit included
            sys.modules.pop(module_name, None)
            raise TxError(f"{spec}: cannot import {path}: {one_line(err)}") from err
        factory = getattr(module, name, None)
        if factory is None:
            raise TxError(f"{spec}: {path} has no {name}")
        if not callable(factory):
            raise TxError(f"{spec}: {name} in {path} is not callable")
        try:
            result = factory()
        except KeyboardInterrupt:
            raise
        except BaseException as err:  # the user's code may raise anything, SystemExit included
            raise TxError(f"{spec}: {name}() raised {one_line(err)}") from err
    return _from_factory_result(spec, name, result)


class _ProcessExit(BaseException):
    def __init__(self, status):
        super().__init__(f"os._exit({status}) (the process would have ended with nothing written)")


def _refuse_exit(status=0):
    raise _ProcessExit(status)


@contextlib.contextmanager
def _exit_raises() -> Iterator[None]:
    """os._exit in the user's code raises instead: it would end txcompile silently, exit 0,
    with nothing written and nothing said."""
    real, os._exit = os._exit, _refuse_exit
    try:
        yield
    finally:
        os._exit = real


@contextlib.contextmanager
def _on_sys_path(folder: Path) -> Iterator[None]:
    added = str(folder) not in sys.path
    if added:
        sys.path.insert(0, str(folder))
    try:
        yield
    finally:
        if added and str(folder) in sys.path:
            sys.path.remove(str(folder))


def _from_factory_result(spec: str, name: str, result) -> TorchModel:
    if not (isinstance(result, tuple | list) and len(result) == 2):
        raise TxError(f"{spec}: {name}() must return (module, example_inputs), got {type(result).__name__}")
    module, examples = result
    if not isinstance(module, torch.nn.Module):
        raise TxError(f"{spec}: {name}() returned {type(module).__name__}, not a torch.nn.Module")
    if isinstance(examples, torch.Tensor):
        examples = (examples,)
    if isinstance(examples, Mapping):
        items = list(examples.items())
    elif isinstance(examples, tuple | list):
        items = [(f"input_{i}", value) for i, value in enumerate(examples)]
    else:
        raise TxError(
            f"{spec}: example_inputs must be a dict or tuple of tensors, got {type(examples).__name__}"
        )
    if not items:
        raise TxError(f"{spec}: example_inputs is empty")
    for key, value in items:
        if not isinstance(key, str) or not key.isidentifier():
            raise TxError(f"{spec}: example input name {key!r} is not an identifier")
        if not isinstance(value, torch.Tensor):
            raise TxError(f"{spec}: example input {key} is {type(value).__name__}, not a tensor")
    specs = [infer_spec(key, value) for key, value in items]
    dims = _example_dims(specs, [value for _, value in items])
    module.eval()
    return TorchModel(module, specs, _output_names(module, items, spec, name), spec, dims)


def infer_spec(name: str, value: torch.Tensor) -> InputSpec:
    """Kind and symbolic dims from the name, dtype and rank (see module doc)."""
    dtype = str(value.dtype).removeprefix("torch.")
    is_int = not value.dtype.is_floating_point and not value.dtype.is_complex
    shape: list[int | str] = list(value.shape)
    if shape:
        shape[0] = "batch"
    if len(shape) >= 2 and (is_int and len(shape) == 2 or not is_int and len(shape) == 3):
        shape[1] = "seq"
    lowered = name.lower()
    zero_one = value.numel() > 0 and bool(((value == 0) | (value == 1)).all())
    if value.dtype == torch.bool or ("mask" in lowered and (is_int or zero_one)):
        return InputSpec(name, dtype, tuple(shape), "mask")
    if is_int and "position" in lowered:
        return InputSpec(name, dtype, tuple(shape), "positions")
    if is_int:
        high = int(value.max()) + 1 if value.numel() else 2
        low = min(0, int(value.min())) if value.numel() else 0
        return InputSpec(name, dtype, tuple(shape), "ids", low, max(high, low + 2))
    return InputSpec(name, dtype, tuple(shape), "normal")


def _example_dims(specs: list[InputSpec], values: list[torch.Tensor]) -> dict[str, int]:
    """The example's own sizes (so export sees what the factory author chose)."""
    dims = {}
    for spec, value in zip(specs, values, strict=True):
        for dim, size in zip(spec.shape, value.shape, strict=True):
            if isinstance(dim, str):
                dims.setdefault(dim, int(size))
    return dims


def _output_names(module, items, spec: str, name: str) -> list[str]:
    """output, or output_0, output_1, ... when forward returns several tensors."""
    try:
        with torch.no_grad():
            outputs = flatten_outputs(module(*[value for _, value in items]))
    except Exception as err:
        raise TxError(f"{spec}: forward fails on {name}()'s example inputs: {one_line(err)}") from None
    if not outputs:
        raise TxError(f"{spec}: forward returns no tensors")
    return ["output"] if len(outputs) == 1 else [f"output_{i}" for i in range(len(outputs))]
