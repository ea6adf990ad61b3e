"""Every pass by name, and the named pipelines each target runs."""

from __future__ import annotations

from collections.abc import Sequence

from txcompile.graph.errors import TxError
from txcompile.passes.attention.activations import FuseActivations
from txcompile.passes.attention.embed_layernorm import FuseEmbedLayerNorm
from txcompile.passes.attention.fusion import FuseAttention
from txcompile.passes.attention.remove_padding import RemovePadding
from txcompile.passes.attention.rotary import FuseRotary
from txcompile.passes.base import PassContext, TxPass
from txcompile.passes.cleanup import analyze
from txcompile.passes.cleanup import simplify as cleanup
from txcompile.passes.norms import affine as norm_affine
from txcompile.passes.norms import batchnorm as fold_batchnorm
from txcompile.passes.norms import fuse as norms
from txcompile.passes.norms import preln_rmsnorm
from txcompile.passes.polynomial.contract import CheckContract
from txcompile.passes.polynomial.depth import HeDepth
from txcompile.passes.polynomial.rewrite import PolynomialForm
from txcompile.passes.sparsity import Prune, SparseMatMul, SparsityReport
from txcompile.passes.targets.kernel_check import KernelCheck
from txcompile.passes.targets.pack_matmuls import PackMatMuls
from txcompile.passes.targets.precision import Precision
from txcompile.passes.targets.quantize import Quantize

PASSES: dict[str, type[TxPass]] = {
    cls.name: cls
    for cls in (
        cleanup.FoldConstants,
        cleanup.SimplifyShapes,
        cleanup.RemoveIdentity,
        cleanup.EliminateCommonSubexpressions,
        cleanup.RemoveUnused,
        analyze.Analyze,
        FuseEmbedLayerNorm,
        FuseRotary,
        FuseAttention,
        FuseActivations,
        RemovePadding,
        fold_batchnorm.FoldBatchNorm,
        norms.FuseNorms,
        norm_affine.FoldNormAffine,
        preln_rmsnorm.PreLnToRmsNorm,
        SparsityReport,
        Prune,
        SparseMatMul,
        PolynomialForm,
        CheckContract,
        HeDepth,
        PackMatMuls,
        Quantize,
        Precision,
        KernelCheck,
    )
}

# pack-matmuls packs sibling products (exact) before quantize / precision, which --precision picks
# (each is a no-op otherwise); kernel-check is last.
TARGET_FIT = ["pack-matmuls", "quantize", "precision", "kernel-check"]

CLEANUP = ["fold-constants", "simplify-shapes", "remove-identity", "eliminate-cse", "remove-unused"]
NORMS = ["fold-batchnorm", "fuse-norms"]  # exact; fold-norm-affine and preln-to-rmsnorm are opt-in

PIPELINES: dict[str, tuple[str, list[str]]] = {
    "cpu": (
        "onnxruntime CPU execution provider, fp32",
        [
            *CLEANUP,
            *NORMS,
            "fuse-embed-layernorm",
            "fuse-rotary",
            "fuse-attention",
            "fuse-activations",
            "sparse-matmul",
            "remove-padding",
            *TARGET_FIT,
            "analyze",
        ],
    ),
    "gpu": (
        "onnxruntime CUDA execution provider",
        [
            *CLEANUP,
            *NORMS,
            "fuse-embed-layernorm",
            "fuse-rotary",
            "fuse-attention",
            "fuse-activations",
            "remove-padding",
            *TARGET_FIT,
            "analyze",
        ],
    ),
}

PIPELINES["he"] = (
    "CKKS homomorphic encryption: polynomial-only form, contract check, depth report",
    [*CLEANUP, "he-polynomial", "remove-unused", "he-contract", "he-depth"],
)

TARGETS = {"cpu": "cpu", "gpu": "cuda", "he": "cpu"}  # target → device whose kernels it emits for


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


def with_sparsity(
    names: Sequence[str], sparsity: bool, passes_given: bool, disable: Sequence[str] = ()
) -> list[str]:
    """``--sparsity`` asks for pruning. In a target's pipeline prune and sparse-matmul go right
    after cleanup: the fusions would otherwise pack Q/K/V into one Attention op (hiding those
    layers) and turn bias+Gelu into contrib ops. With ``--passes`` the order given is kept and
    prune goes just before sparse-matmul (or before analyze)."""
    names = list(names)
    if not sparsity or "prune" in names:
        return names
    disabled = set(disable)
    if passes_given:
        added = [n for n in ("prune", "sparse-matmul") if n not in names and n not in disabled]
        if "sparse-matmul" in names:
            at = names.index("sparse-matmul")
        else:
            ends = [names.index(n) for n in (*TARGET_FIT, "analyze") if n in names]
            at = min(ends) if ends else len(names)
    else:
        added = [n for n in ("prune", "sparse-matmul") if n not in disabled]
        names = [n for n in names if n != "sparse-matmul"]
        cleanup = [i for i, n in enumerate(names) if n in CLEANUP]
        at = cleanup[-1] + 1 if cleanup else 0
    names[at:at] = added
    return names


def build(names: Sequence[str], context: PassContext) -> list[TxPass]:
    return [PASSES[name](context) for name in names]
