"""The HE contract: which values are encrypted, and which ops may touch them.

Encrypted (ciphertext) values are the float graph inputs, the token embeddings the client
looks up and encrypts (a ``Gather`` of a constant float table at token ids), and everything
computed from them. Everything else is plaintext the client or server knows: weights,
attention masks, positions, shapes. Ops on plaintext only are free client-side work; an op
with a ciphertext input must be one CKKS can do: additions, multiplications, integer powers,
sums and static data movement.
"""

from __future__ import annotations

import onnx_ir as ir

from txcompile.graph.constants import constant_array, is_constant

ARITHMETIC = {"Add", "Sub", "Neg", "Mul", "MatMul", "Gemm", "ReduceSum", "ReduceMean", "Pow"}
DATA_MOVEMENT = {
    "Reshape",
    "Transpose",
    "Slice",
    "Concat",
    "Gather",
    "Squeeze",
    "Unsqueeze",
    "Pad",
    "Split",
    "Identity",
    "Flatten",
    "Expand",
    "Shape",
}
CONTRACT = ARITHMETIC | DATA_MOVEMENT


def ciphertext_values(graph: ir.Graph) -> set[ir.Value]:
    """Encrypted values, by forward propagation from the encryption points."""
    encrypted = {v for v in graph.inputs if v.dtype is not None and v.dtype.is_floating_point()}
    for node in graph:
        if node.op_type == "Shape":
            continue  # a ciphertext's shape is public
        if any(v in encrypted for v in node.inputs if v is not None) or _token_lookup(node):
            encrypted.update(node.outputs)
    return encrypted


def _token_lookup(node: ir.Node) -> bool:
    if node.op_type != "Gather" or len(node.inputs) < 2:
        return False
    table, indices = node.inputs[0], node.inputs[1]
    floating = table is not None and table.dtype is not None and table.dtype.is_floating_point()
    return floating and is_constant(table) and not is_constant(indices)


def violations(graph: ir.Graph) -> list[str]:
    """One line per node that computes on ciphertext with an op outside the contract."""
    encrypted = ciphertext_values(graph)
    problems = []
    for node in graph:
        inputs = [v for v in node.inputs if v is not None]
        if not any(v in encrypted for v in inputs):
            continue
        why = _why_not(node, encrypted)
        if why:
            problems.append(f"{node.op_type} node {node.name!r}: {why}")
    return problems


def _why_not(node: ir.Node, encrypted: set[ir.Value]) -> str | None:
    if node.domain not in ("", "ai.onnx") or node.op_type not in CONTRACT:
        return "not an addition, multiplication or data movement"
    if node.op_type == "Pow":
        exponent = node.inputs[1]
        if exponent in encrypted or not is_constant(exponent):
            return "exponent is not a constant"
        values = constant_array(exponent)
        if not (values == values.round()).all() or (values < 1).any():
            return "exponent is not a positive integer"
    if node.op_type == "Gather" and node.inputs[1] in encrypted:
        return "indices are encrypted"
    if node.op_type in ("Reshape", "Slice", "Pad", "Expand") and any(v in encrypted for v in node.inputs[1:]):
        return "shape arguments are encrypted"
    return None
