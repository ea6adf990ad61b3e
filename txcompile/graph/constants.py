"""Reading constants: an initializer or a Constant node's output, one way for every pass.

onnx_ir's ``get_const_tensor`` does the reading; these helpers say "not a constant" with
``None`` instead of raising, which is what a rule's check wants to ask.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir


def is_constant(value: ir.Value | None) -> bool:
    """A missing optional input counts as constant (it carries nothing from the user)."""
    if value is None:
        return True
    if value.const_value is not None:
        return True
    producer = value.producer()
    return producer is not None and producer.op_type == "Constant"


def constant_tensor(value: ir.Value | None) -> ir.TensorProtocol | None:
    """The tensor behind ``value`` without reading its data (shape and dtype are free)."""
    return None if value is None else ir.convenience.get_const_tensor(value)


def constant_array(value: ir.Value | None) -> np.ndarray | None:
    """The array behind ``value``, or None when it is computed at run time."""
    if value is None:
        return None
    tensor = ir.convenience.get_const_tensor(value)
    return None if tensor is None else tensor.numpy()


def constant_scalar(value: ir.Value | None) -> float | None:
    """A one-element constant as a float (scales, epsilons, exponents), else None."""
    array = constant_array(value)
    return float(array.reshape(-1)[0]) if array is not None and array.size == 1 else None
