"""torch → ONNX: the dynamo exporter first, the TorchScript exporter when dynamo cannot.

An export only counts when ONNX Runtime loads the model and runs it, at the example sizes
and, for dynamic models, at a second (batch, seq) too, with outputs of PyTorch's shapes.
"auto" falls back to TorchScript when dynamo raises or its model fails that check, and says
why in one line. The graph is kept as torch produced it (torch's own default cleanup only);
optimizing it is the pass manager's job.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import io
import math
import re
import time
from collections.abc import Mapping

import numpy as np
import onnx
import onnx_ir as ir
import torch

from txcompile.graph import modelio, workspace
from txcompile.graph.errors import TxError
from txcompile.graph.inputs import PAST_DIM, InputSpec, concrete_shape, make_feeds, write_specs
from txcompile.graph.ort import create_session, max_abs_diff, padded_rows, run

from .decoder import EXAMPLE_PAST
from .model import TorchModel, flatten_outputs
from .quiet import captured, one_line

EXPORTERS = ("auto", "dynamo", "torchscript")
SOURCE_KEY = "txcompile.source"
EXPORTER_KEY = "txcompile.exporter"


@dataclasses.dataclass
class ExportResult:
    """The exported model and how it was made.

    ``ir_model``'s weights are external data in ``space``, written there once from torch's
    own tensors (no proto of the whole model is built); ``model`` reads them into a proto
    that stands alone. ``max_diff`` is the largest |ORT - PyTorch| over the outputs on the
    example inputs (and on the second sizes for dynamic models). ``warnings`` say what the
    user should know, e.g. a dynamic axis the exporter fixed to its example size.
    """

    ir_model: ir.Model
    space: workspace.Workspace
    exporter: str
    fallback_reason: str | None
    seconds: float
    max_diff: float
    opset: int
    warnings: list[str] = dataclasses.field(default_factory=list)
    log: str = ""

    @functools.cached_property
    def model(self) -> onnx.ModelProto:
        return workspace.standalone_proto(self.ir_model)


class _Broken(Exception):
    """The exporter returned a model that ONNX Runtime cannot load or run correctly."""


def export_onnx(
    model: TorchModel,
    *,
    opset: int | None = None,
    exporter: str = "auto",
    dims: Mapping[str, int] | None = None,
    dynamic: bool = True,
) -> ExportResult:
    """Export ``model`` with ONNX input/output names equal to TorchModel's; see module doc."""
    if exporter not in EXPORTERS:
        raise TxError(f"unknown exporter {exporter!r}: choose {', '.join(EXPORTERS)}")
    start = time.perf_counter()
    dims = model.resolved_dims(dims)
    args = model.example_args(_tracing_dims(model, dims))
    try:
        with torch.no_grad():
            model.module(*args)
    except Exception as err:
        raise TxError(f"{model.source}: forward fails on example inputs: {one_line(err)}") from err
    if not dynamic and any(PAST_DIM in spec.shape for spec in model.inputs):
        raise TxError(f"{model.source}: a decoder with a KV cache grows by a token a step; drop --static")
    specs = model.inputs if dynamic else [_static(spec, dims) for spec in model.inputs]
    attempts = ["dynamo", "torchscript"] if exporter == "auto" else [exporter]
    failures: dict[str, str] = {}
    last_error: Exception | None = None
    for name in attempts:
        log, space = io.StringIO(), workspace.Workspace()
        try:
            with space.active():
                with captured(log):
                    proto = _EXPORTERS[name](model, args, specs, opset, space)
                synced, kept, warnings = _graph_specs(proto, specs, name)
                warnings += _tracer_warnings(log.getvalue())
                max_diff, unchecked = _verify(model, proto, synced, dims)
                warnings += unchecked
        except _Broken as err:
            failures[name], last_error = f"ONNX Runtime rejects its model: {err}", err
            space.close()
            continue
        except Exception as err:  # torch raises many types; each is a reason to fall back
            failures[name], last_error = one_line(err), err
            space.close()
            continue
        if opset is not None and _opset(proto) != opset:
            warnings.append(f"asked for opset {opset}; the {name} exporter wrote opset {_opset(proto)}")
        write_specs(proto, [spec for spec in synced if spec.name in kept])
        _set_metadata(proto, {**model.metadata, SOURCE_KEY: model.source, EXPORTER_KEY: name})
        reason = failures.get("dynamo")
        return ExportResult(
            ir_model=modelio.to_ir(proto, model.source, base_dir=space.path),
            space=space,
            exporter=name,
            fallback_reason=f"dynamo failed: {reason}" if reason else None,
            seconds=time.perf_counter() - start,
            max_diff=max_diff,
            opset=_opset(proto),
            warnings=warnings,
            log=log.getvalue(),
        )
    detail = "; ".join(f"{name}: {reason}" for name, reason in failures.items())
    raise TxError(f"export failed: {detail}") from last_error  # the chain keeps the traceback


# ---------------------------------------------------------------------------------------------
# the two exporters


# Each writes the weights into ``space`` and returns the model as a proto that references them.


def _export_dynamo(model: TorchModel, args: tuple, specs: list[InputSpec], opset: int | None, space):
    program = torch.onnx.export(
        model.module,
        args,
        dynamo=True,
        verbose=False,
        input_names=model.input_names,
        output_names=model.output_names,
        opset_version=opset,
        dynamic_shapes=_dynamic_shapes(model.module, args, specs),
    )
    proto = space.proto(program.model)  # the weights written out once, straight from torch's tensors
    _fix_specialized_dims(proto, program, args, specs)
    _rename_dims(proto, specs)
    return proto


def _fix_specialized_dims(proto: onnx.ModelProto, program, args: tuple, specs: list[InputSpec]) -> None:
    """Write the sizes torch.export fixed into the graph inputs (torch leaves their symbols there).

    An axis is fixed when its symbol has no range or a range of one value: torch.export proved
    it equals the example's size (e.g. a reshape to a constant), so the graph runs at that only.
    """
    try:
        exported = program.exported_program
        free = {
            str(symbol)
            for symbol, bounds in exported.range_constraints.items()
            if bounds.lower != bounds.upper
        }
        placeholders = [
            node
            for node in exported.graph.nodes
            if node.op == "placeholder" and node.name in set(exported.graph_signature.user_inputs)
        ]
    except Exception:  # private structure of torch: without it the check after export still runs
        return
    inputs = {value.name: value for value in proto.graph.input}
    for spec, node, arg in zip(specs, placeholders, args, strict=False):
        value = inputs.get(spec.name)
        shape = getattr(node.meta.get("val"), "shape", None)
        if value is None or shape is None or not isinstance(arg, torch.Tensor):
            continue
        for axis, (dim, size) in enumerate(zip(shape, arg.shape, strict=False)):
            graph_dim = value.type.tensor_type.shape.dim
            if axis >= len(graph_dim) or not isinstance(spec.shape[axis], str):
                continue
            if isinstance(dim, torch.SymInt) and str(dim) in free:
                continue
            graph_dim[axis].Clear()
            graph_dim[axis].dim_value = int(size)


def _export_torchscript(model: TorchModel, args: tuple, specs: list[InputSpec], opset: int | None, space):
    buffer = io.BytesIO()
    axes = {
        spec.name: {axis: dim for axis, dim in enumerate(spec.shape) if isinstance(dim, str)}
        for spec in specs
    }
    with torch.no_grad():
        torch.onnx.export(
            model.module,
            args,
            buffer,
            dynamo=False,
            verbose=False,
            input_names=model.input_names,
            output_names=model.output_names,
            opset_version=opset,
            dynamic_axes={name: value for name, value in axes.items() if value} or None,
        )
    exported = modelio.to_ir(onnx.load_from_string(buffer.getvalue()), model.source)
    return space.proto(exported)


_EXPORTERS = {"dynamo": _export_dynamo, "torchscript": _export_torchscript}


def _dynamic_shapes(module: torch.nn.Module, args: tuple, specs: list[InputSpec]):
    """Per-argument {axis: Dim.AUTO} maps laid out like ``forward``'s parameters (``*args`` nests).

    ``Dim.AUTO`` rather than named dims: an axis the model really fixes (a learned position
    table of one length) is then specialized instead of failing the export; ``_rename_dims``
    gives the symbolic axes our names afterwards, and the check reports the fixed ones.
    """
    auto = torch.export.Dim.AUTO
    shapes = [{axis: auto for axis, dim in enumerate(s.shape) if isinstance(dim, str)} or None for s in specs]
    if all(shape is None for shape in shapes):
        return None
    try:
        bound = inspect.signature(module.forward).bind(*args)
    except (TypeError, ValueError):
        return tuple(shapes)
    layout, index = [], 0
    for param_name, value in bound.arguments.items():
        kind = inspect.signature(module.forward).parameters[param_name].kind
        if kind is inspect.Parameter.VAR_POSITIONAL:
            layout.append(tuple(shapes[index : index + len(value)]))
            index += len(value)
        else:
            layout.append(shapes[index])
            index += 1
    return tuple(layout)


def _rename_dims(proto: onnx.ModelProto, specs: list[InputSpec]) -> None:
    """Replace torch's symbols (s0, s27, ...) by the specs' names ("batch", "seq") everywhere."""
    by_name = {spec.name: spec for spec in specs}
    mapping: dict[str, str] = {}
    for value in proto.graph.input:
        spec = by_name.get(value.name)
        if spec is None:
            continue
        for dim, wanted in zip(value.type.tensor_type.shape.dim, spec.shape, strict=False):
            if dim.dim_param and isinstance(wanted, str):
                mapping.setdefault(dim.dim_param, wanted)
    if not mapping:
        return
    pattern = re.compile(
        r"\b(" + "|".join(re.escape(k) for k in sorted(mapping, key=len, reverse=True)) + r")\b"
    )
    values = [*proto.graph.input, *proto.graph.output, *proto.graph.value_info]
    for value in values:
        for dim in value.type.tensor_type.shape.dim:
            if dim.dim_param:
                dim.dim_param = pattern.sub(lambda m: mapping[m.group(1)], dim.dim_param)


# ---------------------------------------------------------------------------------------------
# checking the exported model


def _verify(
    model: TorchModel, proto: onnx.ModelProto, specs: list[InputSpec], dims: dict
) -> tuple[float, list[str]]:
    """Max |ORT - PyTorch| at the example sizes and, when any axis is dynamic, at other sizes.

    When PyTorch itself fails at the other sizes the model is static in truth: that is said
    in a warning, not blamed on the exporter.
    """
    try:
        session = create_session(proto, prepack=False)
    except Exception as err:
        raise _Broken(f"cannot load: {one_line(err)}") from err
    sizes = [dims]
    if any(isinstance(dim, str) for spec in specs for dim in spec.shape):
        sizes.append(_other_dims(dims))
    worst, warnings = 0.0, []
    for size in sizes:
        feeds = make_feeds(specs, size)
        try:
            expected = _torch_outputs(model, specs, feeds)
        except Exception as err:
            if size is dims:
                raise
            warnings.append(
                f"dynamic axes unchecked: PyTorch fails at {_describe(size)} ({one_line(err)}); "
                "export with dynamic=False if the model takes one size only"
            )
            continue
        try:
            actual = run(session, feeds)
        except Exception as err:
            raise _Broken(f"cannot run at {_describe(size)}: {one_line(err)}") from err
        diff = max_abs_diff(actual, expected, padded_rows(proto, feeds))
        if math.isinf(diff):
            got = [np.shape(v) for v in actual.values()]
            want = [np.shape(v) for v in expected.values()]
            raise _Broken(f"at {_describe(size)} outputs have shapes {got}, PyTorch's {want}")
        worst = max(worst, diff)
    return worst, warnings


def _torch_outputs(model: TorchModel, specs: list[InputSpec], feeds: dict) -> dict[str, np.ndarray]:
    args = [torch.from_numpy(feeds[spec.name]) for spec in specs]
    with torch.no_grad():
        outputs = flatten_outputs(model.module(*args))
    names = [*model.output_names, *(f"output_{i}" for i in range(len(outputs)))]
    return {name: _numpy(out) for name, out in zip(names, outputs, strict=False)}


def _numpy(tensor: torch.Tensor) -> np.ndarray:
    tensor = tensor.detach().cpu()
    return (tensor.float() if tensor.dtype == torch.bfloat16 else tensor).numpy()


def _graph_specs(proto: onnx.ModelProto, specs: list[InputSpec], exporter: str):
    """Specs with the axes the exporter fixed made concrete, the names the graph kept, warnings.

    Verification feeds every spec (PyTorch's forward takes them all; ORT ignores the inputs
    the exporter dropped as unused); the metadata records only the kept ones.
    """
    graph_inputs = {v.name: v for v in proto.graph.input}
    for tensor in proto.graph.initializer:
        graph_inputs.pop(tensor.name, None)
    synced, warnings = [], []
    for spec in specs:
        value = graph_inputs.get(spec.name)
        shape = list(spec.shape)
        graph_dims = value.type.tensor_type.shape.dim if value is not None else []
        for axis, dim in enumerate(graph_dims[: len(shape)]):
            if dim.HasField("dim_value") and isinstance(shape[axis], str):
                warnings.append(
                    f"{exporter} fixed axis {axis} ({shape[axis]}) of {spec.name} to {dim.dim_value}"
                )
                shape[axis] = dim.dim_value
        synced.append(dataclasses.replace(spec, shape=tuple(shape)))
    dropped = [spec.name for spec in specs if spec.name not in graph_inputs]
    if dropped:
        warnings.append(f"{exporter} dropped unused inputs: {', '.join(dropped)}")
    return synced, set(graph_inputs), warnings


def _tracer_warnings(log: str) -> list[str]:
    """TorchScript's hints that tracing baked a value in (e.g. one branch of an ``if``)."""
    found = []
    for line in log.splitlines():
        if line.startswith("TracerWarning: "):
            sentence = line.split(". ")[0].rstrip(".") + "."
            if sentence not in found:
                found.append(sentence)
    return found


def _tracing_dims(model: TorchModel, dims: dict[str, int]) -> dict[str, int]:
    """The example sizes torch traces at: a decoder's past of at least EXAMPLE_PAST, so that no
    exporter takes its length for the constant 0 or 1 (it is verified at its own size after)."""
    if not any(PAST_DIM in spec.shape for spec in model.inputs):
        return dims
    return {**dims, PAST_DIM: max(EXAMPLE_PAST, dims.get(PAST_DIM, 0))}


def _static(spec: InputSpec, dims: Mapping[str, int]) -> InputSpec:
    return dataclasses.replace(spec, shape=concrete_shape(spec, dims))


def _other_dims(dims: Mapping[str, int]) -> dict[str, int]:
    """Sizes unlike the example's: one more batch row, sequences about half as long."""
    return {name: size + 1 if name == "batch" else max(2, size // 2 + 1) for name, size in dims.items()}


def _describe(dims: Mapping[str, int]) -> str:
    return ", ".join(f"{name}={size}" for name, size in dims.items())


def _set_metadata(proto: onnx.ModelProto, values: Mapping[str, str]) -> None:
    existing = {prop.key: prop for prop in proto.metadata_props}
    for key, value in values.items():
        if key in existing:
            existing[key].value = value
        else:
            proto.metadata_props.add(key=key, value=value)


def _opset(proto: onnx.ModelProto) -> int:
    return next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), 0)
