"""Fit a graph to its target: int8/int4 products, fp16/bf16, and a kernel check at the end.

Passes and the rules they apply (rule names as in ``rule_counts`` and node metadata):

- ``pack-matmuls`` (:class:`PackMatMuls`): ``pack-matmuls`` (sibling MatMuls over one input
  and constant weights → one MatMul and a Split);
- ``quantize`` (:class:`Quantize`): ``int8-matmul`` (:class:`Int8MatMulRule`, one per
  MatMul/Gemm, after the whole-model plan of scales and fp32 exclusions), ``int4-matmul``
  (onnxruntime's MatMulNBits quantizer), ``kept-fp32``;
- ``precision`` (:class:`Precision`): ``to-fp16`` / ``to-bf16``, ``insert-cast``, ``weights``
  (a graph-order decision per node, precision_plan.py, then precision_rewrite.py);
- ``kernel-check`` (:class:`KernelCheck`): ``no-kernel`` per op without a kernel (changes nothing).
"""

from .int8_rule import Int8MatMulRule
from .kernel_check import KernelCheck
from .pack_matmuls import PackMatMuls, PackSiblingMatMuls
from .precision import Precision
from .quantize import Quantize

PASSES = (PackMatMuls, Quantize, Precision, KernelCheck)
RULES = {rule.name: rule for rule in (PackSiblingMatMuls, Int8MatMulRule)}

__all__ = ["PASSES", "RULES", "Int8MatMulRule", "KernelCheck", "PackMatMuls", "Precision", "Quantize"]
