"""The main job as functions: optimize an ONNX model, or export a PyTorch model and optimize it.

Both end the same way: the final model is checked against its reference (the input graph, or
PyTorch when we exported it) and written atomically beside its report. The weights are
written once into a workspace (graph/workspace.py) that every pass, check and session of the
run shares, and stay there until the outcome is written or dropped.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnx_ir as ir

from txcompile import pipelines, report
from txcompile.graph import inputs as model_inputs
from txcompile.graph import modelio, progress, workspace, writes
from txcompile.graph import ort as rt
from txcompile.graph.errors import TxError, one_line
from txcompile.graph.nodes import op_histogram
from txcompile.pass_manager import PassManager, PipelineResult
from txcompile.passes.base import PassContext
from txcompile.runtime import generate as rgenerate

DECODE_STEPS = 3  # decode steps after the prefill in a decoder's verification


@dataclasses.dataclass
class Settings:
    target: str = "cpu"
    passes: Sequence[str] | None = None
    disable: Sequence[str] = ()
    atol: float = 1e-4
    verify: bool = True
    dims: dict[str, int] = dataclasses.field(default_factory=dict)
    inputs_npz: str | None = None
    flags: dict[str, Any] = dataclasses.field(default_factory=dict)  # the CLI's flags; passes read theirs
    debug: bool = False


@dataclasses.dataclass
class Outcome:
    final: ir.Model  # its weights live in ``space``
    report: dict[str, Any]
    passed: bool | None
    space: workspace.Workspace | None = None

    @functools.cached_property
    def model(self) -> onnx.ModelProto:
        """The final model as a stand-alone proto, its weights read into memory."""
        return workspace.standalone_proto(self.final)


def verification_feeds(model: onnx.ModelProto, settings: Settings) -> dict[str, np.ndarray]:
    specs = model_inputs.read_specs(model)
    if settings.inputs_npz:
        return model_inputs.load_npz(settings.inputs_npz, specs)
    return model_inputs.make_feeds(specs, settings.dims)


def optimize(
    model: onnx.ModelProto | ir.Model,
    settings: Settings,
    *,
    source: str,
    output: str,
    export: dict[str, Any] | None = None,
    torch_reference=None,
    warnings: list[str] | None = None,
    space: workspace.Workspace | None = None,
) -> Outcome:
    """Run the target's pipeline; judge the result against PyTorch if given, else the input.
    An ``ir.Model`` given is adopted: its weights move into the run's workspace — ``space``
    when given (an export's, which holds them already), else a new one."""
    owned = space is None
    space = workspace.Workspace() if owned else space
    try:
        with space.active():
            return _optimize(model, settings, space, source, output, export, torch_reference, warnings)
    except BaseException:
        if owned:
            space.close()
        raise


def _optimize(model, settings: Settings, space, source, output, export, torch_reference, warnings):
    device = pipelines.device_for(settings.target)
    clock = report.Phases()
    with progress.step("reading the input"):
        source_ir = model if isinstance(model, ir.Model) else modelio.to_ir(model, source)
        try:  # the input, its weights now referenced in the workspace
            model = space.proto(source_ir)
        except ValueError as err:  # a tensor whose data does not fit its shape
            raise TxError(f"{source}: invalid ONNX model: {one_line(err)}") from None
        modelio.check(space.file(model), source)
        names = pipelines.pass_names(settings.target, settings.passes, settings.disable)
        sparsity = settings.flags.get("sparsity") is not None
        names = pipelines.with_sparsity(names, sparsity, bool(settings.passes), settings.disable)
        feeds = verification_feeds(model, settings)
        if settings.verify:
            _check_runs(model, feeds, device)
        else:
            with rt.refusal("the input model"):  # it must load, or the final model cannot be judged
                rt.create_session(model, device, prepack=False)
    clock.lap("input")
    context = PassContext(settings.target, device, feeds, dict(settings.flags))
    manager = PassManager(
        pipelines.build(names, context),
        device=device,
        atol=settings.atol,
        verify=settings.verify,
        debug=settings.debug,
    )
    result = manager.run(source_ir, feeds)
    clock.lap("passes")
    with progress.step("verifying" if settings.verify else "loading the result"):
        final = space.proto(result.ir_model)
        verification = _verification(final, result, feeds, settings, device, torch_reference)
        if settings.verify and _is_decoder(final):
            _verify_steps(verification, model, final, settings, device, torch_reference)
    clock.lap("verification")
    ops_before = op_histogram(source_ir)
    ops_after = op_histogram(result.ir_model)
    built = report.build(
        source=source,
        output=output,
        target=settings.target,
        device=device,
        pipeline=result,
        ops_before=ops_before,
        ops_after=ops_after,
        verification=verification,
        export=export,
        warnings=warnings,
        resources=clock.record(),
    )
    return Outcome(result.ir_model, built, verification.get("passed"), space)


def _check_runs(model: onnx.ModelProto, feeds, device: str) -> None:
    try:
        rt.run(rt.create_session(model, device, prepack=False), feeds)
    except Exception as err:
        raise TxError(f"the input model does not run in onnxruntime ({device}): {rt.ort_line(err)}") from None


def _verification(final, result: PipelineResult, feeds, settings: Settings, device, torch_reference):
    info: dict[str, Any] = {
        "enabled": settings.verify,
        "atol": settings.atol,
        "inputs": {k: {"shape": list(v.shape), "dtype": str(v.dtype)} for k, v in feeds.items()},
        "reference": "pytorch" if torch_reference is not None else "input model",
        "max_diff": None,
        "passed": None,
        "exact": result.exact,
    }
    if not settings.verify:
        rt.create_session(final, device, prepack=False)  # the final model must at least load
        return info
    outputs = result.final_outputs
    reference = torch_reference(feeds) if torch_reference is not None else result.reference_outputs
    info["max_diff"] = rt.max_abs_diff(reference, outputs, rt.padded_rows(final, feeds))
    if result.exact:
        info["passed"] = info["max_diff"] <= settings.atol
    return info


def _is_decoder(model: onnx.ModelProto) -> bool:
    return any(model_inputs.PAST_INPUT.fullmatch(v.name) for v in model.graph.input) and any(
        rt.PRESENT.fullmatch(v.name) for v in model.graph.output
    )


def _verify_steps(info: dict, model, final, settings: Settings, device: str, torch_reference) -> None:
    """A decoder is also judged as it is used: a padded prefill, then decode steps that feed
    the present keys/values back as the past (against PyTorch, else the input model)."""
    session = rt.create_session(final, device, prepack=False)
    reference_session = rt.create_session(model, device, prepack=False) if torch_reference is None else None

    def reference(feeds):
        return torch_reference(feeds) if reference_session is None else rt.run(reference_session, feeds)

    specs = model_inputs.read_specs(final)
    diff = rgenerate.compare_steps(
        lambda feeds: rt.run(session, feeds),
        reference,
        specs,
        steps=DECODE_STEPS,
        padded_rows=lambda feeds: rt.padded_rows(final, feeds),
    )
    info["decode_steps"] = {"steps": DECODE_STEPS, "max_diff": diff}
    if info["passed"] is not None:
        info["passed"] = bool(info["passed"] and diff <= settings.atol)


def write(outcome: Outcome, output: str | Path) -> Path:
    """The model, its external data and its report, renamed into place together; the report
    records the sha256 of the model files it describes, so a stale pair can be told."""
    output = Path(output)
    path = report.report_path(output)
    with writes.transaction(output.parent) as staging, progress.step(f"writing {output}"):
        clock = report.Phases()
        outcome.report["files"] = dict(sorted(modelio.stage_ir(outcome.final, staging, output.name).items()))
        clock.lap("write")
        outcome.report["resources"] = report.merged(outcome.report.get("resources"), clock.record())
        staging.file(path.name).write_text(report.dumps(outcome.report), encoding="utf-8")
    return path
