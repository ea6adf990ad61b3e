"""Every pass by name, and the named pipelines each target runs."""

from __future__ import annotations

from collections.abc import Sequence

from txcompile.errors import TxError
from txcompile.passes import analyze, cleanup
from txcompile.passes.base import PassContext, TxPass

PASSES: dict[str, type[TxPass]] = {
    cls.name: cls
    for cls in (
        cleanup.FoldConstants,
        cleanup.SimplifyShapes,
        cleanup.RemoveIdentity,
        cleanup.EliminateCommonSubexpressions,
        cleanup.RemoveUnused,
        analyze.Analyze,
    )
}

CLEANUP = ["fold-constants", "simplify-shapes", "remove-identity", "eliminate-cse", "remove-unused"]

PIPELINES: dict[str, tuple[str, list[str]]] = {
    "cpu": ("onnxruntime CPU execution provider, fp32", [*CLEANUP, "analyze"]),
    "gpu": ("onnxruntime CUDA execution provider", [*CLEANUP, "analyze"]),
}

TARGETS = {"cpu": "cpu", "gpu": "cuda"}  # target → device whose kernels it emits for


def device_for(target: str) -> str:
    if target not in TARGETS:
        raise TxError(f"unknown target {target!r}: choose one of {', '.join(TARGETS)}")
    return TARGETS[target]


def pass_names(target: str, passes: Sequence[str] | None = None, disable: Sequence[str] = ()) -> list[str]:
    """The target's pipeline, or the passes asked for, less the disabled ones."""
    device_for(target)
    names = list(passes) if passes else list(PIPELINES[target][1])
    unknown = [n for n in [*names, *disable] if n not in PASSES]
    if unknown:
        raise TxError(f"unknown pass {unknown[0]!r}; `txcompile passes` lists them")
    return [n for n in names if n not in set(disable)]


def build(names: Sequence[str], context: PassContext) -> list[TxPass]:
    return [PASSES[name](context) for name in names]
