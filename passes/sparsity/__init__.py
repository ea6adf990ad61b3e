"""Sparsity that runs faster in plain ONNX Runtime: report, prune, and rewrite sparse MatMuls.

``sparsity-report`` describes the weights, ``prune`` makes them block-sparse (approximate), and
``sparse-matmul`` rewrites sparse weights into forms ORT runs faster than dense (exact, or
int8 when asked). Rules, by the names in ``rule_counts`` and node metadata:

- ``sparse-matmul`` (:class:`SparseMatMul`, sparse_rules.py), in this order:
  ``structured-channels`` (:class:`StructuredChannelsRule`), ``transposed-chain``
  (:class:`TransposedChainRule`), ``column-groups`` / ``column-groups-int8``
  (:class:`ColumnGroupsRule`);
- ``prune`` (:class:`Prune`): ``blocks-{K}x{N}`` and ``neurons`` (a whole-model ranking per
  layer, not a rule); ``sparsity-report`` (:class:`SparsityReport`): ``sparse-weights``.
"""

from .prune import Prune
from .report import SparsityReport
from .sparse_matmul import SparseMatMul
from .sparse_rules import ColumnGroupsRule, StructuredChannelsRule, TransposedChainRule

PASSES = (SparsityReport, Prune, SparseMatMul)
RULES = {rule.name: rule for rule in SparseMatMul.rules}

__all__ = [
    "PASSES",
    "RULES",
    "ColumnGroupsRule",
    "Prune",
    "SparseMatMul",
    "SparsityReport",
    "StructuredChannelsRule",
    "TransposedChainRule",
]
