"""ONNX Runtime sessions per device, built from a ModelProto or a path.

Inside an active workspace (workspace.py) a proto is written to its folder and loaded from
there, its weights given as shared initializers over the workspace's one mapping of them
(never a copy per session). Elsewhere, models over the 2 GB
protobuf limit are written to a temporary folder with external data and loaded from there,
so every caller can hand over an in-memory model.
"""

from __future__ import annotations

import contextlib
import contextvars
import json
import os
import re
import tempfile
import threading
from collections.abc import Iterator, Mapping

import numpy as np
import onnx
import onnxruntime as ort
from onnxruntime.capi import onnxruntime_pybind11_state as _ort_state

from txcompile.graph import modelio, size, workspace
from txcompile.graph.errors import TxError, one_line

PROVIDERS = {"cpu": ["CPUExecutionProvider"], "cuda": ["CUDAExecutionProvider", "CPUExecutionProvider"]}
# onnxruntime's own rewrites that make a graph slower on a device (passes/norms/skip.py measures it)
DISABLED_OPTIMIZERS = {"cpu": ["SkipLayerNormFusion"]}
PADDED_OUTPUTS_KEY = "txcompile.padded_outputs"
PRESENT = re.compile(r"present\.\d+\.(key|value)")  # a decoder's cache outputs

# also for events after import, where onnxruntime was imported before txcompile
ort.disable_telemetry_events()
# errors reach the user as our one line; onnxruntime's log would print them first (4: fatal only)
_log_severity = 4
ort.set_default_logger_severity(_log_severity)

# what onnxruntime raises for a model or feeds it refuses (its Python layer raises ValueError)
ORT_ERRORS = (
    *(v for v in vars(_ort_state).values() if isinstance(v, type) and issubclass(v, Exception)),
    ValueError,
)
_TIME_LIMIT: contextvars.ContextVar[float | None] = contextvars.ContextVar("run_time_limit", default=None)


class RunTimeout(BaseException):
    """A run stopped at the --timeout bound. A BaseException, like KeyboardInterrupt, so that no
    pass mistakes it for a failed rewrite and goes on to the next run."""


@contextlib.contextmanager
def time_limit(seconds: float | None) -> Iterator[None]:
    """Stop every :func:`run` inside the block that takes longer than ``seconds``."""
    token = _TIME_LIMIT.set(seconds)
    try:
        yield
    finally:
        _TIME_LIMIT.reset(token)


@contextlib.contextmanager
def refusal(what: str) -> Iterator[None]:
    """onnxruntime refusing a model or inputs the user gave is bad input (exit 2), in one line."""
    try:
        yield
    except ORT_ERRORS as err:
        raise TxError(f"{what}: onnxruntime refused it: {ort_line(err)}") from None
    except MemoryError:
        raise TxError(f"{what}: out of memory in onnxruntime") from None


def ort_line(err: BaseException) -> str:
    """onnxruntime's message without its ``[ONNXRuntimeError] : 2 : INVALID_ARGUMENT :`` prefix."""
    return re.sub(r"^\[ONNXRuntimeError\] : \d+ : \w+ : ", "", one_line(err))


def verbose_logs(on: bool) -> None:
    """onnxruntime's own warnings and errors on stderr (--debug) or only fatal ones."""
    global _log_severity
    _log_severity = 2 if on else 4
    ort.set_default_logger_severity(_log_severity)


def session_options(
    threads: int | None = None, optimize: bool = True, prepack: bool = True
) -> ort.SessionOptions:
    """``prepack=False`` for sessions that only check a model: prepacking keeps a second,
    kernel-shaped copy of every MatMul weight, which pays off only over many runs."""
    options = ort.SessionOptions()
    options.log_severity_level = _log_severity
    if not prepack:
        options.add_session_config_entry("session.disable_prepacking", "1")
    if threads:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    options.graph_optimization_level = (
        ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimize else ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    )
    return options


def check_device(device: str) -> list[str]:
    if device not in PROVIDERS:
        raise TxError(f"unknown device {device!r}: choose cpu or cuda")
    if device == "cuda" and "CUDAExecutionProvider" not in ort.get_available_providers():
        raise TxError("device cuda needs onnxruntime-gpu with the CUDA execution provider")
    return PROVIDERS[device]


@contextlib.contextmanager
def _loadable(model: onnx.ModelProto | str | os.PathLike) -> Iterator[str | bytes]:
    """A path in the active workspace; else bytes for small in-memory models, a temporary path
    with external data for large ones."""
    if not isinstance(model, onnx.ModelProto):
        yield os.fspath(model)
        return
    if (active := workspace.current()) is not None:
        yield str(active.file(model))
        return
    if size.fits_in_protobuf(model):
        yield model.SerializeToString()
        return
    with tempfile.TemporaryDirectory(prefix="txcompile-") as folder:
        path = os.path.join(folder, "model.onnx")
        modelio.save_with_external_data(model, path)
        yield path


def create_session(
    model: onnx.ModelProto | str | os.PathLike,
    device: str = "cpu",
    threads: int | None = None,
    optimize: bool = True,
    prepack: bool = True,
) -> ort.InferenceSession:
    providers = check_device(device)
    options = session_options(threads, optimize, prepack)
    active = workspace.current()
    shared = active.shared_weights(model) if active and isinstance(model, onnx.ModelProto) else {}
    values = {name: ort.OrtValue.ortvalue_from_numpy(array) for name, array in shared.items()}
    for name, value in values.items():
        options.add_initializer(name, value)
    with _loadable(model) as loadable:
        session = ort.InferenceSession(
            loadable, options, providers=providers, disabled_optimizers=DISABLED_OPTIMIZERS.get(device, [])
        )
    session.txcompile_shared_weights = values  # onnxruntime reads them for the session's life
    return session


def run(session: ort.InferenceSession, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Outputs by name; feeds the session does not take are left out."""
    wanted = {i.name for i in session.get_inputs()}
    chosen = {k: v for k, v in feeds.items() if k in wanted}
    limit = _TIME_LIMIT.get()
    if limit is None:
        outputs = session.run(None, chosen)
    else:
        options = ort.RunOptions()
        timer = threading.Timer(limit, lambda: setattr(options, "terminate", True))
        timer.start()
        try:
            outputs = session.run(None, chosen, options)
        except ORT_ERRORS:
            if options.terminate:
                raise RunTimeout(
                    f"an onnxruntime run took over {limit:g} s (--timeout); stopped it"
                ) from None
            raise
        finally:
            timer.cancel()
    return {o.name: value for o, value in zip(session.get_outputs(), outputs, strict=True)}


def padded_rows(model: onnx.ModelProto, feeds: Mapping[str, np.ndarray]) -> dict[int, np.ndarray]:
    """Outputs whose values at padded tokens mean nothing, so comparisons skip them: output
    position → the [B, S] mask of real tokens. Those the model leaves zero at padded tokens
    (remove-padding records them), and a decoder's ``present.*`` cache, [B, heads, total_seq,
    D] over the same positions as its attention mask (→ a [B, 1, total_seq] mask): a padding
    token's keys are never attended to, and exporters disagree on what a query that sees no
    key at all computes."""
    rows = _present_rows(model, feeds)
    record = {p.key: p.value for p in model.metadata_props}.get(PADDED_OUTPUTS_KEY)
    if not record:
        return rows
    try:
        record = json.loads(record)
        if not (
            isinstance(record, dict)
            and isinstance(record.get("mask"), str)
            and isinstance(record.get("outputs"), list)
            and all(
                isinstance(p, int) and not isinstance(p, bool) and 0 <= p < 2**16 for p in record["outputs"]
            )
        ):
            raise ValueError('not {"mask": input name, "outputs": [output positions]}')
    except (ValueError, RecursionError) as err:
        raise TxError(f"the model's {PADDED_OUTPUTS_KEY} metadata is unreadable: {one_line(err)}") from None
    if record["mask"] not in feeds:
        return rows
    keep = np.asarray(feeds[record["mask"]]) != 0
    return rows | {position: keep for position in record["outputs"]}


def _present_rows(model: onnx.ModelProto, feeds: Mapping[str, np.ndarray]) -> dict[int, np.ndarray]:
    mask = feeds.get("attention_mask")
    if mask is None or np.ndim(mask) != 2:
        return {}
    keep = (np.asarray(mask) != 0)[:, None, :]
    return {i: keep for i, out in enumerate(model.graph.output) if PRESENT.fullmatch(out.name)}


def max_abs_diff(
    a: Mapping[str, np.ndarray],
    b: Mapping[str, np.ndarray],
    real_rows: Mapping[int, np.ndarray] | None = None,
) -> float:
    """Largest absolute difference over outputs matched by position (names may differ); where
    ``real_rows`` names an output, only its real tokens count (see :func:`padded_rows`)."""
    if len(a) != len(b):
        return float("inf")
    worst = 0.0
    for position, (x, y) in enumerate(zip(a.values(), b.values(), strict=True)):
        x, y = np.asarray(x), np.asarray(y)
        if x.shape != y.shape:
            return float("inf")
        keep = (real_rows or {}).get(position)
        if keep is not None and np.isnan(x).any() != np.isnan(y).any():
            return float("inf")  # NaN only on one side, even at padding, would reach real tokens later
        if keep is not None and keep.ndim == 3 and x.ndim == 4 and x.shape[::2] == keep.shape[::2]:
            x, y = np.moveaxis(x, 2, 1)[keep[:, 0]], np.moveaxis(y, 2, 1)[keep[:, 0]]  # a KV cache
        elif keep is not None and x.shape[:2] == keep.shape:
            x, y = x[keep], y[keep]
        elif keep is not None and x.ndim and x.shape[0] == keep.size:  # flattened [B·S, ...]
            x, y = x[keep.reshape(-1)], y[keep.reshape(-1)]
        if x.size == 0:
            continue
        diff = np.abs(x.astype(np.float64) - y.astype(np.float64))
        if np.isnan(diff).any():
            both_nan = np.isnan(x.astype(np.float64)) & np.isnan(y.astype(np.float64))
            if not both_nan[np.isnan(diff)].all():
                return float("inf")
            diff = np.where(both_nan, 0.0, diff)
        worst = max(worst, float(diff.max()))
    return worst
