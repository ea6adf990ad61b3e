"""Sparsity that runs faster in plain ONNX Runtime: report, prune, and rewrite sparse MatMuls.

``sparsity-report`` describes the weights, ``prune`` makes them block-sparse (approximate), and
``sparse-matmul`` rewrites sparse weights into forms ORT runs faster than dense (exact, or
int8 when asked).
"""

from .prune import Prune
from .report import SparsityReport
from .sparse_matmul import SparseMatMul

__all__ = ["Prune", "SparseMatMul", "SparsityReport"]
