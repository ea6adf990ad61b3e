"""The norms family: fusing decomposed norms, and the exact norm rewrites from the literature.

Passes and their rules (rule names as in ``rule_counts`` and the node metadata):

* ``fuse-norms`` (fuse.py, exact, in every pipeline): ``no-op-cast``, ``layer-norm``,
  ``rms-norm`` (decomposed.py; the matchers are match.py), ``skip-layer-norm``,
  ``skip-rms-norm`` (skip.py).
* ``fold-batchnorm`` (batchnorm.py, exact, in every pipeline): ``conv-batchnorm``,
  ``linear-batchnorm``, ``linear-transposed-batchnorm``, ``batchnorm-linear`` — tried in that
  order per BatchNorm (first.py); the folds themselves are batchnorm_linear.py and linear.py.
* ``fold-norm-affine`` (affine.py, opt-in): ``fold-<norm op>`` (rule class ``FoldAffine``).
* ``preln-to-rmsnorm`` (preln_rmsnorm.py, opt-in): ``layer-norm``, ``center-writer``,
  ``center-explicitly``, ``layer-norm-to-rms-norm``; the plan is preln_plan.py, the stream walk
  stream.py with one handler per writer op in writers.py.

To add a rule: a ``Rule`` subclass (passes/rules.py) with ``match`` / ``check`` (a reason, or
None) / ``rewrite`` in the module of its idea, then list it in its pass's ``rules`` and here.
"""

from txcompile.passes.norms.affine import FoldAffine, FoldNormAffine
from txcompile.passes.norms.batchnorm import (
    BatchNormLinear,
    ConvBatchNorm,
    FoldBatchNorm,
    LinearBatchNorm,
    LinearTransposedBatchNorm,
)
from txcompile.passes.norms.decomposed import LayerNorm, NoOpCast, RmsNorm
from txcompile.passes.norms.fuse import FuseNorms
from txcompile.passes.norms.preln_rmsnorm import (
    CenterExplicitly,
    CenterWriter,
    LayerNormToRmsNorm,
    PreLnToRmsNorm,
)
from txcompile.passes.norms.skip import SkipLayerNorm, SkipRmsNorm

PASSES = (FuseNorms, FoldBatchNorm, FoldNormAffine, PreLnToRmsNorm)
RULES = {
    rule.name: rule
    for rule in (
        NoOpCast,
        LayerNorm,
        RmsNorm,
        SkipLayerNorm,
        SkipRmsNorm,
        ConvBatchNorm,
        LinearBatchNorm,
        LinearTransposedBatchNorm,
        BatchNormLinear,
        FoldAffine,
        CenterWriter,
        CenterExplicitly,
        LayerNormToRmsNorm,
    )
}

__all__ = [*(cls.__name__ for cls in PASSES), *(rule.__name__ for rule in RULES.values()), "PASSES", "RULES"]
