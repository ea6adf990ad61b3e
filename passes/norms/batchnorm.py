"""fold-batchnorm: inference BatchNormalization disappears into the linear layer beside it.

At inference a BatchNorm is ``y = x * s + t`` per channel (``s = g / sqrt(var + eps)``,
``t = b - mean * s``), so it folds exactly into a neighbouring linear layer. The rules, tried
in this order for each BatchNorm (the first that fits folds it, first.py):

* ``conv-batchnorm``: Conv → BN: scale the Conv's output channels, shift its bias.
* ``linear-batchnorm``: MatMul/Gemm [N, C] → BN: scale the weight's columns, shift the bias.
* ``linear-transposed-batchnorm``: the BatchNorm-in-transformer form (re-parameterized BN as in
  SLAB): Linear [B, S, C] → Transpose(0, 2, 1) → BN → Transpose(0, 2, 1); the pair of
  transposes goes too.
* ``batchnorm-linear``: BN (channel axis last, directly or inside the transpose pair) read only
  by linear layers: ``(x s + t) W = x (diag(s) W) + t W``.

BatchNorms that fit none of these stay, and their site record says why.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx_ir as ir
import onnx_ir.passes.common as common

from txcompile.graph.shapes import infer_shapes
from txcompile.passes.base import TxPass
from txcompile.passes.norms.batchnorm_linear import (
    LinearFold,
    bn_affine,
    conv_fits,
    fold_into_conv,
    fold_into_linear,
    linear_fold,
)
from txcompile.passes.norms.common import is_op, node_site, rank, single_reader
from txcompile.passes.norms.first import apply_first
from txcompile.passes.norms.linear import LinearReader, fold_into_readers, linear_readers
from txcompile.passes.rules import FUSED, Rewrite, Rule


@dataclasses.dataclass
class BnSite:
    """A BatchNormalization, its (s, t) once read, and what the passing check found."""

    node: ir.Node
    affine: tuple[np.ndarray, np.ndarray] | str | None = None
    fold: LinearFold | None = None
    readers: list[LinearReader] = dataclasses.field(default_factory=list)

    @property
    def x(self) -> ir.Value:
        return self.node.inputs[0]


def _is_swap(node: ir.Node | None) -> bool:
    return is_op(node, "Transpose") and list(node.attributes.get_ints("perm", [])) == [0, 2, 1]


def _bypass(bn: ir.Node) -> None:
    ir.convenience.replace_all_uses_with(bn.outputs[0], bn.inputs[0], replace_graph_outputs=True)


class BatchNormRule(Rule):
    """Reads the BatchNorm's (s, t) once; a BatchNorm without them fits no rule."""

    def match(self, model, state):
        return [BnSite(node) for node in model.graph if is_op(node, "BatchNormalization")]

    def site_name(self, site: BnSite):
        return node_site(site.node)

    def check(self, site: BnSite, state):
        if site.affine is None:
            site.affine = bn_affine(site.node)
        return site.affine if isinstance(site.affine, str) else self.fits(site, *site.affine)

    def fits(self, site: BnSite, scale: np.ndarray, shift: np.ndarray) -> str | None:
        raise NotImplementedError


class ConvBatchNorm(BatchNormRule):
    """Conv → BN, the Conv's output read by the BN alone."""

    name = "conv-batchnorm"

    def fits(self, site, scale, shift):
        conv = site.x.producer()
        if not is_op(conv, "Conv") or single_reader(site.x) is not site.node:
            return f"{site.x.name} is not written by a Conv that only the BatchNorm reads"
        return None if conv_fits(conv, scale) else f"{conv.name}'s weight or bias do not fit the channels"

    def rewrite(self, model, site, state):
        fold_into_conv(model.graph, site.x.producer(), *site.affine)
        _bypass(site.node)
        return Rewrite("Conv")


class LinearBatchNorm(BatchNormRule):
    """MatMul(+Add) / Gemm [N, C] → BN, the linear output read by the BN alone."""

    name = "linear-batchnorm"

    def fits(self, site, scale, shift):
        if rank(site.x) != 2 or single_reader(site.x) is not site.node:
            return f"{site.x.name} is not a [N, C] value that only the BatchNorm reads"
        site.fold = linear_fold(site.x.producer(), scale)
        return None if site.fold else f"{site.x.name} is not written by a MatMul / Gemm with constant weights"

    def rewrite(self, model, site, state):
        fold_into_linear(model.graph, site.fold, *site.affine)
        _bypass(site.node)
        return Rewrite(site.fold.node.op_type)


class LinearTransposedBatchNorm(BatchNormRule):
    """Linear → Transpose(0, 2, 1) → BN → Transpose(0, 2, 1) (SLAB): the transposes go too."""

    name = "linear-transposed-batchnorm"

    def fits(self, site, scale, shift):
        before, after = site.x.producer(), single_reader(site.node.outputs[0])
        if not (_is_swap(before) and _is_swap(after)):
            return "it does not sit between two Transpose(0, 2, 1)"
        if single_reader(before.inputs[0]) is not before or single_reader(site.x) is not site.node:
            return "a value between the linear layer and the BatchNorm has another reader"
        site.fold = linear_fold(before.inputs[0].producer(), scale)
        return None if site.fold else f"{before.inputs[0].name} is not written by a MatMul / Gemm"

    def rewrite(self, model, site, state):
        before, after = site.x.producer(), single_reader(site.node.outputs[0])
        fold_into_linear(model.graph, site.fold, *site.affine)
        ir.convenience.replace_all_uses_with(after.outputs[0], before.inputs[0], replace_graph_outputs=True)
        return Rewrite(site.fold.node.op_type)


class BatchNormLinear(BatchNormRule):
    """BN (channel axis last, or inside the transpose pair) read only by linear layers."""

    name = "batchnorm-linear"

    def fits(self, site, scale, shift):
        x, after = site.x, single_reader(site.node.outputs[0])
        generic = f"{x.name} is not written by a Conv or linear layer that only it reads"
        if not (rank(x) == 2 or (rank(x) == 3 and _is_swap(after))):
            return generic
        result = site.node.outputs[0] if rank(x) == 2 else after.outputs[0]
        site.readers, problem = linear_readers(result)
        if problem:
            return f"no linear layer writes it alone and {problem}"
        if not site.readers or any(r.weight.shape[0] != scale.size for r in site.readers):
            return generic
        return None

    def rewrite(self, model, site, state):
        x, y = site.x, site.node.outputs[0]
        before, after = x.producer(), single_reader(y)
        fold_into_readers(model.graph, site.readers, *site.affine)
        if rank(x) == 2:
            ir.convenience.replace_all_uses_with(y, x, replace_graph_outputs=True)
        elif _is_swap(before) and single_reader(x) is site.node:  # the transposes cancel
            ir.convenience.replace_all_uses_with(
                after.outputs[0], before.inputs[0], replace_graph_outputs=True
            )
        else:
            after.replace_input_with(0, x)
        return Rewrite(site.readers[0].node.op_type)


class FoldBatchNorm(TxPass):
    name = "fold-batchnorm"
    summary = "fold inference BatchNormalization into the adjacent Conv / Gemm / MatMul(+Add)"
    rules = (ConvBatchNorm, LinearBatchNorm, LinearTransposedBatchNorm, BatchNormLinear)

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        rules = [rule() for rule in self.rules]
        batchnorms = rules[0].match(model, None)
        if batchnorms:
            infer_shapes(model)
        records = [apply_first(self, model, site, rules, None, self.name) for site in batchnorms]
        fused = sum(r.status == FUSED for r in records)
        if fused:
            common.RemoveUnusedNodesPass()(model)
        self.details = {
            "sites": [r.as_dict() for r in records],
            "fused": fused,
            "unfused": len(records) - fused,
        }
        return ir.passes.PassResult(model, bool(fused))
