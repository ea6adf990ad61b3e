"""One copy of the weights for a whole pipeline: a temporary folder they are written to once.

Every pass works on an IR clone of the accepted model, and clones share their tensors. The
workspace turns those tensors into external data in its folder, so a model of any size
serializes to a small proto that only references them. onnxruntime maps that data from the
files instead of copying it into each session, the ONNX checker reads the model from its
path, and no proto of the whole model (protobuf's 2 GiB limit, a second copy of every
weight) is ever built. Tensors a pass adds go to a new file the next time the model is
serialized; files are never rewritten, so the tensors that point into them stay valid.

While a workspace is active (``with space.active():``, or ``with Workspace():``, which also
removes it at the end), :func:`current` returns it and sessions built from protos it
serialized are loaded from its folder.

Sessions do not each map the weights: :meth:`Workspace.shared_weights` gives them arrays
over one mapping per data file (onnxruntime's shared initializers), so a run holds each
weight's pages once however many sessions it builds. :meth:`trim` lets go of the pages
between passes; the next reader faults them back in from the page cache.
"""

from __future__ import annotations

import contextlib
import contextvars
import itertools
import mmap
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir

from txcompile.graph import size, writes

MIN_BYTES = 1024  # smaller tensors stay inline: writing them out would cost more than it saves
PREFIX = "txcompile-work-"  # then the owner's pid: a killed run's folder is removed by the next
# dtypes onnxruntime takes as numpy arrays; sessions read the others (bfloat16, int4, …) themselves
SHAREABLE = {
    np.dtype(t)
    for t in (np.float32, np.float16, np.float64, np.int8, np.int16, np.int32, np.int64, np.uint8)
    + (np.uint16, np.uint32, np.uint64, np.bool_)
}

_CURRENT: contextvars.ContextVar[Workspace | None] = contextvars.ContextVar("workspace", default=None)


def current() -> Workspace | None:
    """The active workspace, if any."""
    return _CURRENT.get()


class Workspace:
    """A temporary folder holding a model's weights as external data, removed on exit."""

    def __init__(self) -> None:
        _remove_abandoned()
        self._folder = tempfile.TemporaryDirectory(
            prefix=f"{PREFIX}{os.getpid()}-", ignore_cleanup_errors=True
        )
        self.path = Path(self._folder.name)
        self._numbers = itertools.count()
        self._maps: dict[str, mmap.mmap] = {}  # data file → its one mapping for sessions

    def __enter__(self) -> Workspace:
        self._token = _CURRENT.set(self)
        return self

    def __exit__(self, *exc) -> None:
        _CURRENT.reset(self._token)
        self.close()

    @contextlib.contextmanager
    def active(self) -> Iterator[Workspace]:
        """The current workspace inside the block; it stays on disk after it."""
        token = _CURRENT.set(self)
        try:
            yield self
        finally:
            _CURRENT.reset(token)

    def close(self) -> None:
        """Remove the folder (also done when the workspace is garbage collected)."""
        self._folder.cleanup()

    def holds(self, tensor: ir.TensorProtocol) -> bool:
        return isinstance(tensor, ir.ExternalTensor) and Path(tensor.base_dir) == self.path

    def adopt(self, model: ir.Model) -> int:
        """Move ``model``'s tensors that are not here yet into a new data file (in place: each
        value's tensor becomes an external tensor over the same bytes); how many moved."""
        _detach_from_protos(model)
        values = [
            v
            for graph in model.graphs()
            for v in graph.initializers.values()
            if _worth_moving(v.const_value) and not self.holds(v.const_value)
        ]
        if not values:
            return 0
        unique = {id(v.const_value): v.const_value for v in values}
        written = ir.external_data.convert_tensors_to_external(
            list(unique.values()), base_dir=self.path, relative_path=f"weights-{next(self._numbers)}.data"
        )
        external = dict(zip(unique, written, strict=True))
        for value in values:
            value.const_value = external[id(value.const_value)]
        return len(unique)

    def proto(self, model: ir.Model) -> onnx.ModelProto:
        """``model`` as a proto whose weights are references to this folder (after adopting them)."""
        self.adopt(model)
        return ir.serde.serialize_model(model)

    def shared_weights(self, proto: onnx.ModelProto) -> dict[str, np.ndarray]:
        """Arrays for ``proto``'s main-graph weights in this folder, by initializer name: every
        session that takes them as shared initializers reads the same pages."""
        arrays = {}
        for tensor in proto.graph.initializer:
            if tensor.data_location != onnx.TensorProto.EXTERNAL:
                continue
            info = {entry.key: entry.value for entry in tensor.external_data}
            location, offset = info.get("location", ""), int(info.get("offset") or 0)
            array = self._mapped(location, offset, tensor)
            if array is not None:
                arrays[tensor.name] = array
        return arrays

    def _mapped(self, location: str, offset: int, tensor: onnx.TensorProto) -> np.ndarray | None:
        try:
            dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type))
        except (KeyError, TypeError):
            return None
        if dtype not in SHAREABLE or Path(location).name != location:
            return None
        if location not in self._maps:
            if not (self.path / location).is_file():
                return None
            with open(self.path / location, "rb") as file:
                self._maps[location] = mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ)
        count = int(np.prod(tensor.dims, dtype=np.int64))
        array = np.frombuffer(self._maps[location], dtype=dtype, count=count, offset=offset)
        return array.reshape(tuple(tensor.dims))

    def trim(self, *models: ir.Model) -> None:
        """Let go of the weight pages this process has read (sessions' and the ``models``' own
        reads); the data stays valid and is faulted back in on the next read."""
        if not hasattr(mmap, "MADV_DONTNEED"):  # Windows: the pages stay until the run ends
            return
        for mapping in self._maps.values():
            mapping.madvise(mmap.MADV_DONTNEED)
        for graph in (graph for model in models for graph in model.graphs()):
            for value in graph.initializers.values():
                tensor = value.const_value
                if self.holds(tensor) and getattr(tensor, "raw", None) is not None:
                    tensor.raw.madvise(mmap.MADV_DONTNEED)

    def file(self, proto: onnx.ModelProto) -> Path:
        """``proto`` written here, for onnxruntime or the checker to read with its external data."""
        path = self.path / f"model-{next(self._numbers)}.onnx"
        if size.fits_in_protobuf(proto):
            path.write_bytes(proto.SerializeToString())
        else:  # weights held inline (not serialized by this workspace): written out beside it
            ir.save(ir.serde.deserialize_model(proto), path, external_data=path.name + ".data")
        return path


def _remove_abandoned() -> None:
    """Workspaces of processes that no longer run: a run killed (the OOM killer, kill -9)
    leaves its folder, a copy of the model's weights, behind."""
    for entry in Path(tempfile.gettempdir()).glob(PREFIX + "*"):
        pid = entry.name[len(PREFIX) :].partition("-")[0]
        owner = int(pid) if pid.isdigit() and len(pid) < 10 else None
        if owner and not entry.is_symlink() and entry.is_dir() and not writes.process_alive(owner):
            shutil.rmtree(entry, ignore_errors=True)


def serialize(model: ir.Model) -> onnx.ModelProto:
    """The proto to build a session or check from: its weights referenced in the active
    workspace, else (no workspace) the whole model in memory."""
    active = current()
    return active.proto(model) if active is not None else ir.serde.serialize_model(model)


def _detach_from_protos(model: ir.Model) -> None:
    """Small tensors still read from a ModelProto get their own copy: one such tensor keeps
    the whole parsed proto, every weight in it, alive."""

    def own(tensor):
        return ir.Tensor(tensor.numpy(), dtype=tensor.dtype, name=tensor.name)

    for graph in model.graphs():
        for value in graph.initializers.values():
            tensor = value.const_value
            if isinstance(tensor, ir.TensorProtoTensor) and tensor.dtype != ir.DataType.STRING:
                if not _worth_moving(tensor):
                    value.const_value = own(tensor)
        for node in graph:
            for name, attr in node.attributes.items():
                tensor = attr.value if attr.type == ir.AttributeType.TENSOR else None
                if isinstance(tensor, ir.TensorProtoTensor) and tensor.dtype != ir.DataType.STRING:
                    node.attributes[name] = ir.AttrTensor(name, own(tensor))


def _worth_moving(tensor: ir.TensorProtocol | None) -> bool:
    return tensor is not None and tensor.dtype != ir.DataType.STRING and tensor.nbytes >= MIN_BYTES


def in_memory(model: ir.Model) -> ir.Model:
    """A clone of ``model`` with every external tensor read into memory (for a proto that must
    stand alone, away from the files its weights are in). The clone shares its tensors with
    ``model``, so each is copied, not released as onnx_ir's ``load_to_model`` does: that would
    close the mapping under ``model`` and under any array still reading it (BufferError)."""
    clone = model.clone()
    for graph in clone.graphs():
        for value in graph.initializers.values():
            tensor = value.const_value
            if isinstance(tensor, ir.ExternalTensor):
                value.const_value = ir.Tensor(tensor.numpy().copy(), name=tensor.name, dtype=tensor.dtype)
    return clone


def standalone_proto(model: ir.Model) -> onnx.ModelProto:
    """``model`` as a proto with every weight in it, valid away from any workspace."""
    return ir.serde.serialize_model(in_memory(model))
