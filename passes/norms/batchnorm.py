"""fold-batchnorm: inference BatchNormalization disappears into the linear layer beside it.

At inference a BatchNorm is ``y = x * s + t`` per channel (``s = g / sqrt(var + eps)``,
``t = b - mean * s``), so it folds exactly into a neighbouring linear layer:

* ``conv-batchnorm``: Conv → BN: scale the Conv's output channels, shift its bias.
* ``linear-batchnorm``: MatMul/Gemm [N, C] → BN: scale the weight's columns, shift the bias.
* ``linear-transposed-batchnorm``: the BatchNorm-in-transformer form (re-parameterized BN as in
  SLAB): Linear [B, S, C] → Transpose(0, 2, 1) → BN → Transpose(0, 2, 1); the pair of
  transposes goes too.
* ``batchnorm-linear``: BN (channel axis last, directly or inside the transpose pair) read only
  by linear layers: ``(x s + t) W = x (diag(s) W) + t W``.

BatchNorms that fit none of these stay, and the report says why.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import onnx_ir.passes.common as common

from txcompile.graph.shapes import infer_shapes
from txcompile.passes.base import TxPass
from txcompile.passes.norms import affine as norm_affine
from txcompile.passes.norms.common import constant, is_op, new_initializer, rank, set_constant_input


def bn_affine(node: ir.Node) -> tuple[np.ndarray, np.ndarray] | str:
    """(s, t) of an inference BatchNormalization in float64, or why it has none."""
    if node.attributes.get_int("training_mode", 0) != 0 or len(node.outputs) > 1:
        return "it runs in training mode"
    arrays = [constant(v) for v in node.inputs[1:5]]
    if any(a is None for a in arrays):
        return "its statistics or affine parameters are not constants"
    gamma, beta, mean, var = (a.astype(np.float64).reshape(-1) for a in arrays)
    scale = gamma / np.sqrt(var + node.attributes.get_float("epsilon", 1e-5))
    return scale, beta - mean * scale


def _single_reader(value: ir.Value) -> ir.Node | None:
    readers = value.consumers()
    return readers[0] if len(readers) == 1 and not value.is_graph_output() else None


def _is_swap(node: ir.Node | None) -> bool:
    return is_op(node, "Transpose") and list(node.attributes.get_ints("perm", [])) == [0, 2, 1]


class FoldBatchNorm(TxPass):
    name = "fold-batchnorm"
    summary = "fold inference BatchNormalization into the adjacent Conv / Gemm / MatMul(+Add)"

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        self.details = {"folded": [], "left": []}
        if any(is_op(node, "BatchNormalization") for node in graph):
            infer_shapes(model)
        for node in list(graph):
            if not is_op(node, "BatchNormalization"):
                continue
            site = node.name or node.outputs[0].name
            affine = bn_affine(node)
            rule = affine if isinstance(affine, str) else self._fold(graph, node, *affine)
            if rule.startswith("!") or isinstance(affine, str):
                self.details["left"].append({"site": site, "reason": rule.lstrip("!")})
                continue
            self.rule_counts[rule] += 1
            self.details["folded"].append({"site": site, "rule": rule})
        if self.rule_counts:
            common.RemoveUnusedNodesPass()(model)
        return ir.passes.PassResult(model, bool(self.rule_counts))

    def _fold(self, graph: ir.Graph, bn: ir.Node, scale: np.ndarray, shift: np.ndarray) -> str:
        """The rule that folded ``bn``, or ``!reason`` when none could."""
        x, y = bn.inputs[0], bn.outputs[0]
        producer = x.producer()
        if is_op(producer, "Conv") and _single_reader(x) is bn:
            if self._into_conv(graph, producer, scale, shift):
                return self._bypass(bn, x, "conv-batchnorm")
        if rank(x) == 2 and _single_reader(x) is bn and self._into_linear(graph, producer, scale, shift):
            return self._bypass(bn, x, "linear-batchnorm")
        before, after = producer, _single_reader(y)
        if _is_swap(before) and _is_swap(after) and _single_reader(before.inputs[0]) is before:
            if _single_reader(x) is bn and self._into_linear(
                graph, before.inputs[0].producer(), scale, shift
            ):
                ir.convenience.replace_all_uses_with(
                    after.outputs[0], before.inputs[0], replace_graph_outputs=True
                )
                return "linear-transposed-batchnorm"
        if rank(x) == 2 or (rank(x) == 3 and _is_swap(after)):
            result = y if rank(x) == 2 else after.outputs[0]
            readers, problem = norm_affine.linear_readers(result)
            if problem is None and readers and all(r.weight.shape[0] == scale.size for r in readers):
                norm_affine.fold_into_readers(graph, readers, scale, shift)
                if rank(x) == 2:
                    ir.convenience.replace_all_uses_with(y, x, replace_graph_outputs=True)
                elif _is_swap(before) and _single_reader(x) is bn:  # the transposes cancel
                    ir.convenience.replace_all_uses_with(result, before.inputs[0], replace_graph_outputs=True)
                else:
                    after.replace_input_with(0, x)
                return "batchnorm-linear"
            if problem:
                return f"!no linear layer writes it alone and {problem}"
        return f"!{x.name} is not written by a Conv or linear layer that only it reads"

    def _bypass(self, bn: ir.Node, x: ir.Value, rule: str) -> str:
        ir.convenience.replace_all_uses_with(bn.outputs[0], x, replace_graph_outputs=True)
        return rule

    def _into_conv(self, graph, conv: ir.Node, scale, shift) -> bool:
        weight = constant(conv.inputs[1])
        if weight is None or weight.shape[0] != scale.size:
            return False
        has_bias = len(conv.inputs) > 2 and conv.inputs[2] is not None
        bias = constant(conv.inputs[2]) if has_bias else np.zeros(scale.size, weight.dtype)
        if bias is None:
            return False
        shape = (-1,) + (1,) * (weight.ndim - 1)
        set_constant_input(conv, 1, (weight * scale.reshape(shape)).astype(weight.dtype), graph)
        new_bias = (bias.astype(np.float64) * scale + shift).astype(weight.dtype)
        if has_bias:
            set_constant_input(conv, 2, new_bias, graph)
        else:
            conv.resize_inputs(3)
            conv.replace_input_with(2, new_initializer(graph, f"{conv.name or 'conv'}.bias", new_bias))
        return True

    def _into_linear(self, graph, node: ir.Node | None, scale, shift) -> bool:
        """Scale the output columns of MatMul(+const Add) / Gemm ``node`` by ``scale``, add ``shift``."""
        if node is None:
            return False
        add = None
        if is_op(node, "Add"):
            add, node = node, next((v.producer() for v in node.inputs if constant(v) is None), None)
            if node is None or _single_reader(node.outputs[0]) is not add:
                return False
        if is_op(node, "MatMul"):
            weight = constant(node.inputs[1])
            if weight is None or weight.ndim != 2 or weight.shape[1] != scale.size:
                return False
            bias_at = None
            if add is not None:
                bias_at = 1 if add.inputs[0] is node.outputs[0] else 0
                bias = constant(add.inputs[bias_at])
                if bias is None or bias.ndim != 1:
                    return False
            set_constant_input(node, 1, (weight * scale[None, :]).astype(weight.dtype), graph)
            if add is None:
                norm_affine.add_matmul_bias(graph, node, shift.astype(weight.dtype))
            else:
                set_constant_input(add, bias_at, (bias * scale + shift).astype(bias.dtype), graph)
            return True
        if is_op(node, "Gemm") and add is None:
            weight = constant(node.inputs[1])
            transposed = node.attributes.get_int("transB", 0) == 1
            if weight is None or (weight.shape[0] if transposed else weight.shape[1]) != scale.size:
                return False
            beta = node.attributes.get_float("beta", 1.0)
            has_c = len(node.inputs) > 2 and node.inputs[2] is not None
            c = constant(node.inputs[2]) if has_c else np.zeros(scale.size, weight.dtype)
            if c is None or (has_c and beta == 0.0) or c.shape[-1:] != scale.shape:
                return False
            scaled = weight * (scale[:, None] if transposed else scale[None, :])
            set_constant_input(node, 1, scaled.astype(weight.dtype), graph)
            beta = beta if has_c else 1.0
            new_c = (c.astype(np.float64) * scale + shift / beta).astype(weight.dtype)
            node.attributes["beta"] = ir.AttrFloat32("beta", beta)
            if has_c:
                set_constant_input(node, 2, new_c, graph)
            else:
                node.resize_inputs(3)
                node.replace_input_with(2, new_initializer(graph, f"{node.name or 'gemm'}.bias", new_c))
            return True
        return False
