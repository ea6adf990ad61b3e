"""Verification inputs: what each graph input means and how to draw valid values for it.

Exporters record an :class:`InputSpec` per input in the model's metadata; for any other
ONNX file the specs are inferred from the graph (token ids feed an embedding ``Gather``, so
their valid range is that table's row count).
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from collections.abc import Mapping

import numpy as np
import onnx

from txcompile.graph.errors import TxError, one_line

METADATA_KEY = "txcompile.inputs"
MAX_DRAWN_ELEMENTS = 2**28  # 1 GiB of float32 per input: larger ones are a typo or a hostile shape
KINDS = ("ids", "mask", "positions", "normal", "uniform")
PAST_DIM, TOTAL_DIM = "past_seq", "total_seq"  # a decoder's cached length; the mask's past + seq
DEFAULT_DIMS = {"batch": 2, "seq": 16, PAST_DIM: 0}  # a decoder is verified on a prefill
PAST_INPUT = re.compile(r"past_key_values\.(\d+)\.(key|value)")


@dataclasses.dataclass(frozen=True)
class InputSpec:
    """One graph input: dtype, shape (ints or symbolic names) and the kind of values it takes.

    kinds: ``ids`` integers in [low, high); ``mask`` 1s then 0s (padding at the end of every
    row but the first; at the start for a mask over ``total_seq``); ``positions``
    past_seq..past_seq+seq-1 per row; ``normal`` N(0, 1); ``uniform`` in [low, high]. The
    axis name ``total_seq`` is always past_seq + seq.
    """

    name: str
    dtype: str
    shape: tuple[int | str, ...]
    kind: str = "normal"
    low: float = 0.0
    high: float = 1.0

    def to_json(self) -> dict:
        return dataclasses.asdict(self) | {"shape": list(self.shape)}

    @classmethod
    def from_json(cls, data: Mapping) -> InputSpec:
        """A spec read from a model's metadata, which a downloaded file can fill with anything:
        every field is checked, and a bad one raises ValueError naming it."""
        if not isinstance(data, Mapping) or set(data) - FIELDS or not {"name", "dtype", "shape"} <= set(data):
            raise ValueError(f"an entry is not an object with fields {', '.join(sorted(FIELDS))}")
        name, dtype, shape = data["name"], data["dtype"], data["shape"]
        kind, low, high = data.get("kind", "normal"), data.get("low", 0.0), data.get("high", 1.0)
        if not isinstance(name, str) or dtype not in DTYPES:
            raise ValueError(f"entry {name!r}: dtype {dtype!r} is not one of {', '.join(DTYPES)}")
        if not isinstance(shape, list) or not all(_is_dim(d) for d in shape):
            raise ValueError(f"entry {name!r}: shape must list sizes (0 to 2^31) or axis names")
        if kind not in KINDS:
            raise ValueError(f"entry {name!r}: kind {kind!r} is not one of {', '.join(KINDS)}")
        if not (_is_bound(low) and _is_bound(high) and low < high):
            raise ValueError(f"entry {name!r}: low and high must be finite numbers with low < high")
        return cls(name, dtype, tuple(shape), kind, low, high)


FIELDS = {f.name for f in dataclasses.fields(InputSpec)}
DTYPES = ("float32", "float16", "float64", "int64", "int32", "int16", "int8", "uint8", "bool")


def _is_dim(dim) -> bool:
    if isinstance(dim, str):
        return 0 < len(dim) <= 256
    return isinstance(dim, int) and not isinstance(dim, bool) and 0 <= dim < 2**31


def _is_bound(value) -> bool:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return False
    return abs(value) <= 2**63 and math.isfinite(value)


def concrete_shape(spec: InputSpec, dims: Mapping[str, int]) -> tuple[int, ...]:
    """Resolve symbolic dims by name; unnamed ones become batch (axis 0) or seq (others)."""
    dims = {PAST_DIM: DEFAULT_DIMS[PAST_DIM], **dims}
    shape = []
    for axis, dim in enumerate(spec.shape):
        if isinstance(dim, int) and dim > 0:
            shape.append(dim)
        elif dim == TOTAL_DIM:
            shape.append(int(dims[PAST_DIM]) + int(dims.get("seq", DEFAULT_DIMS["seq"])))
        elif isinstance(dim, str) and dim in dims:
            shape.append(int(dims[dim]))
        else:
            shape.append(int(dims.get("batch" if axis == 0 else "seq", 1)))
    return tuple(shape)


def make_feeds(
    specs: list[InputSpec], dims: Mapping[str, int] | None = None, seed: int = 0
) -> dict[str, np.ndarray]:
    """Draw one valid input per spec; masks pad about a quarter of every row after the first."""
    dims = {**DEFAULT_DIMS, **(dims or {})}
    rng = np.random.default_rng(seed)
    feeds = {}
    for spec in specs:
        shape = concrete_shape(spec, dims)
        if math.prod(shape) > MAX_DRAWN_ELEMENTS:
            raise TxError(
                f"input {spec.name} would be {'x'.join(map(str, shape))} = {math.prod(shape):.3g} values "
                f"(at most {MAX_DRAWN_ELEMENTS:.3g} are drawn); choose smaller --batch/--seq/--input-shape"
            )
        dtype = np.dtype(spec.dtype)
        if spec.kind == "ids":
            value = rng.integers(int(spec.low), int(spec.high), size=shape)
        elif spec.kind == "mask":
            value = _padding_mask(shape, left=spec.shape[-1] == TOTAL_DIM)
        elif spec.kind == "positions":
            past = int(dims[PAST_DIM]) if TOTAL_DIM in _names(specs) else 0
            value = np.broadcast_to(np.arange(past, past + shape[-1]), shape).copy()
        elif spec.kind == "uniform":
            value = rng.uniform(spec.low, spec.high, size=shape)
        else:
            value = rng.standard_normal(size=shape)
        feeds[spec.name] = np.ascontiguousarray(value.astype(dtype))
    return feeds


def _names(specs: list[InputSpec]) -> set:
    return {dim for spec in specs for dim in spec.shape if isinstance(dim, str)}


def _padding_mask(shape: tuple[int, ...], left: bool = False) -> np.ndarray:
    """1s with about a quarter of every row after the first padded: at the end, or at the start
    (``left``) for a decoder's mask over past and new tokens, as generate pads prompts."""
    mask = np.ones(shape, dtype=np.int64)
    if len(shape) == 2 and shape[1] > 1:
        pad = max(1, shape[1] // 4)
        if left:
            mask[1:, :pad] = 0
        else:
            mask[1:, shape[1] - pad :] = 0
    return mask


def write_specs(model: onnx.ModelProto, specs: list[InputSpec]) -> None:
    """Record the specs in the model's metadata so later steps draw the same kind of inputs."""
    text = json.dumps([s.to_json() for s in specs])
    for prop in model.metadata_props:
        if prop.key == METADATA_KEY:
            prop.value = text
            return
    model.metadata_props.add(key=METADATA_KEY, value=text)


def read_specs(model: onnx.ModelProto) -> list[InputSpec]:
    """The recorded specs, or specs inferred from the graph when none were recorded."""
    recorded = {p.key: p.value for p in model.metadata_props}.get(METADATA_KEY)
    graph_inputs = _graph_inputs(model)
    if recorded:
        try:
            entries = json.loads(recorded)
            if not isinstance(entries, list):
                raise ValueError("not a list")
            specs = [InputSpec.from_json(d) for d in entries]
        except (ValueError, RecursionError) as err:
            raise TxError(f"the model's {METADATA_KEY} metadata is unreadable: {err}") from None
        if sorted(s.name for s in specs) == sorted(i.name for i in graph_inputs):
            return specs
    specs = [_infer_spec(model, value) for value in graph_inputs]
    return _with_past_dims(specs) if any(PAST_INPUT.fullmatch(s.name) for s in specs) else specs


def _with_past_dims(specs: list[InputSpec]) -> list[InputSpec]:
    """A decoder exported elsewhere (Optimum, a model builder) names its axes its own way: its
    cache inputs take past_seq, its mask past_seq + seq, so drawn inputs fit together."""
    fixed = []
    for spec in specs:
        shape = list(spec.shape)
        if PAST_INPUT.fullmatch(spec.name) and len(shape) == 4:
            shape = ["batch", shape[1], PAST_DIM, shape[3]]
        elif spec.kind == "mask" and len(shape) == 2:
            shape = ["batch", TOTAL_DIM]
        elif len(shape) == 2 and spec.kind in ("ids", "positions"):
            shape = ["batch", "seq"]
        fixed.append(dataclasses.replace(spec, shape=tuple(shape)))
    return fixed


def load_npz(path: str, specs: list[InputSpec]) -> dict[str, np.ndarray]:
    """Inputs given by the user; every graph input must be there."""
    try:
        data = np.load(path, allow_pickle=False)
        if not isinstance(data, np.lib.npyio.NpzFile):
            raise ValueError("a single array (.npy), not an .npz with one array per input")
        with data:
            feeds = {k: data[k] for k in data.files}
        unreadable = [k for k, v in feeds.items() if not isinstance(v, np.ndarray)]
        if unreadable:
            raise ValueError(f"member {unreadable[0]} is not an .npy array")
    except Exception as err:  # numpy and zipfile raise many types for a malformed file
        raise TxError(f"cannot read inputs {path}: {one_line(err)}") from None
    missing = [s.name for s in specs if s.name not in feeds]
    if missing:
        raise TxError(f"inputs {path} lack {', '.join(missing)}")
    for spec in specs:
        value = feeds[spec.name]
        if value.dtype.kind not in "biuf" or value.ndim != len(spec.shape):
            raise TxError(
                f"inputs {path}: {spec.name} is {value.dtype} with {value.ndim} axes; "
                f"the model takes {spec.dtype} with {len(spec.shape)}"
            )
    return {s.name: feeds[s.name].astype(np.dtype(s.dtype)) for s in specs}


def _numpy_name(elem: int) -> str | None:
    """numpy's name for an ONNX element type we can draw: numbers (and bool), not strings."""
    if elem in (onnx.TensorProto.UNDEFINED, onnx.TensorProto.STRING):
        return None
    try:
        return onnx.helper.tensor_dtype_to_np_dtype(elem).name
    except (KeyError, ValueError, TypeError):
        return None


def _graph_inputs(model: onnx.ModelProto) -> list[onnx.ValueInfoProto]:
    initializers = {t.name for t in model.graph.initializer}
    return [v for v in model.graph.input if v.name not in initializers]


def _infer_spec(model: onnx.ModelProto, value: onnx.ValueInfoProto) -> InputSpec:
    tensor_type = value.type.tensor_type
    kind = value.type.WhichOneof("value")
    dtype = _numpy_name(tensor_type.elem_type) if kind == "tensor_type" else None
    if dtype is None:
        what = f"a {kind.removesuffix('_type')}" if kind and kind != "tensor_type" else "a tensor"
        element = onnx.TensorProto.DataType.Name(tensor_type.elem_type) if kind == "tensor_type" else ""
        raise TxError(
            f"input {value.name!r} is {what}{' of ' + element if element else ''}; txcompile draws "
            "only numeric tensors"
        )
    shape = tuple(
        d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in tensor_type.shape.dim
    )
    name = value.name.lower()
    if dtype == "bool" or "mask" in name:
        return InputSpec(value.name, dtype, shape, "mask")
    if np.issubdtype(np.dtype(dtype), np.integer):
        if "position" in name:
            return InputSpec(value.name, dtype, shape, "positions")
        rows = _embedding_rows(model, value.name)
        return InputSpec(value.name, dtype, shape, "ids", 0, rows or 2)
    return InputSpec(value.name, dtype, shape, "normal")


def _embedding_rows(model: onnx.ModelProto, name: str) -> int | None:
    """Rows of the smallest constant table this input indexes (through casts and reshapes)."""
    tables = {t.name: t.dims[0] for t in model.graph.initializer if t.dims}
    passthrough = {"Cast", "Reshape", "Unsqueeze", "Squeeze", "Flatten", "Identity"}
    frontier, seen, rows = [name], {name}, []
    while frontier:
        current = frontier.pop()
        for node in model.graph.node:
            if current not in node.input:
                continue
            if node.op_type == "Gather" and len(node.input) > 1 and node.input[1] == current:
                if node.input[0] in tables:
                    rows.append(tables[node.input[0]])
            elif node.op_type in passthrough and node.input[0] == current:
                for out in node.output:
                    if out not in seen:
                        seen.add(out)
                        frontier.append(out)
    return min(rows) if rows else None


def dims_from_shapes(specs: list[InputSpec], shapes: list[str], dims: Mapping[str, int]) -> dict[str, int]:
    """Fold ``name=1x3x32x32`` options into named dims; fixed axes must agree."""
    result = dict(dims)
    by_name = {s.name: s for s in specs}
    for text in shapes:
        name, _, value = text.partition("=")
        if name not in by_name:
            raise TxError(f"--input-shape {text}: no input named {name!r} (inputs: {', '.join(by_name)})")
        try:
            sizes = [int(v) for v in value.lower().split("x")]
        except ValueError:
            raise TxError(f"--input-shape {text}: expected NAME=AxBxC") from None
        spec = by_name[name]
        if len(sizes) != len(spec.shape) or min(sizes) <= 0:
            raise TxError(f"--input-shape {text}: {name} has rank {len(spec.shape)}")
        for axis, (dim, size) in enumerate(zip(spec.shape, sizes, strict=True)):
            if isinstance(dim, int) and dim > 0 and dim != size:
                raise TxError(f"--input-shape {text}: axis {axis} of {name} is fixed at {dim}")
            if isinstance(dim, str):
                result[dim] = size
    return result
