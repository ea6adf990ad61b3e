"""txcompile from Python: ``compile``, ``optimize`` and ``load``, the functions the CLI calls.

    import txcompile
    result = txcompile.compile("path/to/all-MiniLM-L6-v2", precision="int8")
    result.save("minilm.onnx")
    model = txcompile.load("minilm.onnx")
    embeddings = model.encode(["A man plays guitar.", "Someone strums a guitar."])

Errors are :class:`TxError` (bad input) and :class:`VerificationError` (only from
``save(..., strict=True)``); nothing else is raised on purpose.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnx_ir as ir

from txcompile import compiler, pipelines, report
from txcompile.graph import inputs as model_inputs
from txcompile.graph import modelio, progress, writes
from txcompile.graph.errors import TxError, VerificationError
from txcompile.runtime.text import LoadedModel

__all__ = ["Compiled", "compile", "load", "optimize"]


@dataclasses.dataclass
class Compiled:
    """An optimized model with its pass report; ``passed`` is None when nothing was verified."""

    outcome: compiler.Outcome
    export: Any = None  # the ExportResult of compile(), None for optimize()
    reads: tuple[Path, ...] = ()  # files the result was made from: never replaced by save()

    @property
    def model(self) -> onnx.ModelProto:
        """The optimized model, weights in memory (read on first use; ``save`` streams them)."""
        return self.outcome.model

    @property
    def report(self) -> dict[str, Any]:
        return self.outcome.report

    @property
    def passed(self) -> bool | None:
        return self.outcome.passed

    def save(self, path: str | os.PathLike, *, strict: bool = False) -> Path:
        """The model, its external data and its report, written together; ``strict`` raises
        VerificationError when verification failed (the files are written all the same)."""
        path = Path(path)
        outputs = [path, path.with_name(path.name + ".data"), report.report_path(path)]
        writes.check_outputs(outputs, list(self.reads))
        self.report["output"] = str(path)
        compiler.write(self.outcome, path)
        if strict and self.passed is False:
            check = self.report["verification"]
            raise VerificationError(f"max diff {check['max_diff']:.3g} exceeds atol {check['atol']:g}")
        return path


def settings(
    *,
    target: str = "cpu",
    passes: Sequence[str] | None = None,
    disable: Sequence[str] = (),
    atol: float = 1e-4,
    verify: bool = True,
    dims: dict[str, int] | None = None,
    inputs: str | None = None,
    debug: bool = False,
    **flags: Any,
) -> compiler.Settings:
    """compiler.Settings from keyword options; the rest (precision, sparsity, …) are the flags
    passes read by name, as the CLI's."""
    if atol < 0 or atol != atol:
        raise TxError(f"atol {atol} is not a tolerance (0 or more)")
    known = pass_options()
    unknown = sorted(set(flags) - known)
    if unknown:
        raise TxError(f"unknown option {unknown[0]!r}: passes read {', '.join(sorted(known))}")
    flags = {"target": target, "atol": atol, "verify": verify, **flags}
    return compiler.Settings(
        target, passes, tuple(disable), atol, verify, dict(dims or {}), inputs, flags, debug
    )


def pass_options() -> set[str]:
    """Every option a pass reads by name (the fields of the passes' Options)."""
    return {f.name for cls in pipelines.PASSES.values() for f in dataclasses.fields(cls.Options)}


def export(
    model: str | os.PathLike,
    *,
    task: str | None = None,
    attn_implementation: str | None = None,
    opset: int | None = None,
    exporter: str = "auto",
    dims: dict[str, int] | None = None,
    input_shapes: Sequence[str] = (),
    dynamic: bool = True,
):
    """The PyTorch model ``model`` names and its ONNX export: ``(torch_model, result, dims)``."""
    exporters = _exporters()
    with progress.step(f"loading {model}"):
        torch_model = exporters.load_model_spec(
            str(model), task=task, attn_implementation=attn_implementation
        )
    dims = model_inputs.dims_from_shapes(
        torch_model.inputs, list(input_shapes), {**torch_model.dims, **(dims or {})}
    )
    window = torch_model.window
    if window is not None and 0 < dims.get("seq", 0) <= window:
        torch_model.warnings.append(
            f"{torch_model.source}: verification runs {dims['seq']} tokens, inside the {window}-token "
            f"sliding window; --seq {window + 8} verifies past it"
        )
    with progress.step("exporting to ONNX"):
        result = exporters.export_onnx(
            torch_model, opset=opset, exporter=exporter, dims=dims, dynamic=dynamic
        )
    return torch_model, result, dims


def compile_exported(torch_model, result, config: compiler.Settings, *, output: str = "") -> Compiled:
    """Optimize an export and verify it against PyTorch on the same inputs."""
    export_info = {
        "exporter": result.exporter,
        "fallback_reason": result.fallback_reason,
        "opset": result.opset,
        "seconds": result.seconds,
        "max_diff": result.max_diff,
    }
    outcome = compiler.optimize(
        result.ir_model,
        config,
        source=torch_model.source,
        output=output,
        export=export_info,
        torch_reference=torch_runner(torch_model),
        warnings=[*torch_model.warnings, *result.warnings],
        space=result.space,
    )
    reads = tuple(_exporters().spec_files(torch_model.source))
    return Compiled(outcome, result, reads)


def compile(
    model: str | os.PathLike,
    *,
    task: str | None = None,
    target: str = "cpu",
    precision: str | None = None,
    batch: int | None = None,
    seq: int | None = None,
    opset: int | None = None,
    exporter: str = "auto",
    **options: Any,
) -> Compiled:
    """Export a built-in name, Hugging Face folder or ``file.py:factory`` and optimize it for
    ``target``; ``task`` (a folder's) is inferred when None. Other options are the CLI's flags
    by their Python names (``passes=[...]``, ``sparsity=0.9``, ``verify=False``, …)."""
    dims = _dims(batch, seq)
    torch_model, result, dims = export(model, task=task, opset=opset, exporter=exporter, dims=dims)
    config = settings(target=target, dims=dims, precision=precision, **options)
    return compile_exported(torch_model, result, config)


def optimize(
    model: str | os.PathLike | onnx.ModelProto,
    *,
    target: str = "cpu",
    precision: str | None = None,
    batch: int | None = None,
    seq: int | None = None,
    **options: Any,
) -> Compiled:
    """Optimize an ONNX model (a path or a ModelProto) for ``target``, verified against itself."""
    reads: tuple[Path, ...] = ()
    if isinstance(model, onnx.ModelProto):
        given, source = model, "<ModelProto>"
    else:  # the weights stay in their files until the run's workspace copies them; checked there
        proto, files = modelio.load_model_and_files(model, weights=False, check=False)
        source, reads = str(model), tuple(files)
        given = modelio.to_ir(proto, source, base_dir=Path(model).parent)
    dims = _dims(batch, seq)
    config = settings(target=target, dims=dims, precision=precision, **options)
    return optimize_model(given, config, source=source, reads=reads)


def optimize_model(
    model: onnx.ModelProto | ir.Model, config: compiler.Settings, *, source: str, output: str = "", reads=()
) -> Compiled:
    outcome = compiler.optimize(model, config, source=source, output=output)
    return Compiled(outcome, None, tuple(reads))


def load(path: str | os.PathLike, *, device: str = "cpu", threads: int | None = None) -> LoadedModel:
    """A compiled model, ready to run: ``model(**arrays)``, ``model(texts)``, ``model.encode(texts)``."""
    return LoadedModel(path, device=device, threads=threads)


def torch_runner(torch_model) -> Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]]:
    """PyTorch outputs on the same feeds; inputs the graph dropped are drawn like the rest."""
    import torch

    def run(feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        dropped = [s for s in torch_model.inputs if s.name not in feeds]
        if dropped:
            first = next(iter(feeds.values()))
            dims = {"batch": first.shape[0], "seq": first.shape[-1]} if first.ndim >= 2 else {}
            feeds = {**feeds, **model_inputs.make_feeds(dropped, torch_model.resolved_dims(dims))}
        with torch.no_grad():
            outputs = torch_model.module(*[torch.from_numpy(feeds[s.name]) for s in torch_model.inputs])
        outputs = outputs if isinstance(outputs, tuple | list) else (outputs,)
        return {name: t.detach().numpy() for name, t in zip(torch_model.output_names, outputs, strict=True)}

    return run


def _dims(batch: int | None, seq: int | None) -> dict[str, int]:
    return {k: v for k, v in (("batch", batch), ("seq", seq)) if v}


def _exporters():
    try:
        from txcompile import exporters
    except ImportError as err:
        if err.name != "torch":
            raise
        raise TxError("exporting needs PyTorch: pip install 'txcompile[torch,hf]'") from None
    return exporters
