"""Concrete shapes and values of intermediates: the one "expose them and run ORT" probe.

Heads and head size are read from the graph, never guessed: from static shapes where the
exporter wrote them, otherwise by running the graph once on the verification inputs with the
values of interest added as outputs (TorchScript exports often carry no shapes inside).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import numpy as np
import onnx
import onnx_ir as ir

from txcompile.graph import ort as rt
from txcompile.graph import placeholders, size, workspace


def static_shape(value: ir.Value) -> tuple[int, ...] | None:
    if value.shape is None or not all(isinstance(d, int) for d in value.shape.dims):
        return None
    return tuple(value.shape.dims)


def probe_shapes(
    model: ir.Model, values: Iterable[ir.Value], feeds: Mapping[str, np.ndarray]
) -> dict[str, tuple[int, ...]]:
    """Shapes by value name, from one ORT run (with optimizations off) on ``feeds``; weights
    whose values cannot reach a shape are zeros made as they are read (placeholders.py)."""
    found, initializers = _probe(model, values, feeds, shapes_only=True)
    shapes = {name: tuple(int(d) for d in value.shape) for name, value in found.items()}
    shapes.update({name: tuple(tensor.shape.numpy()) for name, tensor in initializers.items()})
    return shapes


def probe_values(
    model: ir.Model, values: Iterable[ir.Value], feeds: Mapping[str, np.ndarray]
) -> dict[str, np.ndarray]:
    """Values by name, from the same kind of run."""
    found, initializers = _probe(model, values, feeds)
    found.update({name: np.array(tensor.numpy()) for name, tensor in initializers.items()})  # own copies
    return found


def probe_runs(
    model: ir.Model, names: Iterable[str], feeds_list: Iterable[Mapping[str, np.ndarray]]
) -> dict[str, list[np.ndarray]]:
    """Values by name for each feed set, from one session (calibration runs several sets)."""
    names = sorted(set(names))
    session, initializers = _exposed(model, names)
    found: dict[str, list[np.ndarray]] = {name: [] for name in names}
    for feeds in feeds_list:
        outputs = {**rt.run(session, feeds), **{k: np.asarray(v) for k, v in feeds.items()}}
        outputs.update({name: np.array(t.numpy()) for name, t in initializers.items()})
        for name in names:
            found[name].append(outputs[name])
    return found


def _probe(
    model: ir.Model, values: Iterable[ir.Value], feeds: Mapping[str, np.ndarray], shapes_only: bool = False
):
    """(computed values and feeds by name, wanted initializer tensors by name)."""
    names = sorted({v.name for v in values if v is not None and v.name})
    if not feeds or not names:
        return {}, {}
    session, initializers = _exposed(model, names, shapes_only)
    wanted = set(names)
    outputs = rt.run(session, feeds)
    found = {name: value for name, value in outputs.items() if name in wanted}
    found.update({name: np.asarray(value) for name, value in feeds.items() if name in wanted})
    return found, initializers


def _exposed(model: ir.Model, names: list[str], shapes_only: bool = False):
    """A session (optimizations off) whose outputs include ``names``, and the wanted initializers.

    The one place that exposes intermediates, so every probe keeps the >2 GiB path of
    :func:`~txcompile.graph.ort.create_session`.
    """
    proto = workspace.serialize(model)
    inferred = onnx.shape_inference.infer_shapes(proto) if size.fits_in_protobuf(proto) else proto
    types = {vi.name: vi.type for vi in [*inferred.graph.value_info, *inferred.graph.output]}
    wanted = set(names)
    initializers = {t.name for t in proto.graph.initializer}
    taken = initializers | {i.name for i in proto.graph.input} | {o.name for o in proto.graph.output}
    for name in names:
        if name in taken:
            continue
        info = proto.graph.output.add()
        info.name = name
        if name in types:
            info.type.CopyFrom(types[name])
    _only_what_computes(proto.graph, wanted)
    if shapes_only:
        placeholders.replace_weights(proto)
    session = rt.create_session(proto, optimize=False, prepack=False)
    found = {name: v.const_value for name, v in model.graph.initializers.items() if name in wanted}
    return session, {name: tensor for name, tensor in found.items() if tensor is not None}


def _only_what_computes(graph: onnx.GraphProto, wanted: set[str]) -> None:
    """Keep only the outputs in ``wanted`` and the nodes and initializers they are computed
    from: a probe of values near the inputs runs a few nodes, not the model. Graphs with
    subgraphs (which read outer names) and probes of inputs or weights alone stay whole."""
    if not any(o.name in wanted for o in graph.output) or placeholders.has_subgraphs(graph):
        return
    for index in reversed(range(len(graph.output))):
        if graph.output[index].name not in wanted:
            del graph.output[index]
    producer = {name: i for i, node in enumerate(graph.node) for name in node.output if name}
    needed, todo = set(), [o.name for o in graph.output]
    while todo:
        index = producer.get(todo.pop())
        if index is not None and index not in needed:
            needed.add(index)
            todo.extend(name for name in graph.node[index].input if name)
    for index in reversed(range(len(graph.node))):
        if index not in needed:
            del graph.node[index]
    read = {name for node in graph.node for name in node.input} | {o.name for o in graph.output}
    for index in reversed(range(len(graph.initializer))):
        if graph.initializer[index].name not in read:
            del graph.initializer[index]


class Shapes:
    """Static shapes first, probed ones where the graph has none."""

    def __init__(self, probed: Mapping[str, tuple[int, ...]]):
        self.probed = dict(probed)

    def __call__(self, value: ir.Value | None) -> tuple[int, ...] | None:
        if value is None:
            return None
        if value.name in self.probed:
            return self.probed[value.name]
        if value.const_value is not None:
            return tuple(value.const_value.shape.dims)
        return static_shape(value)
