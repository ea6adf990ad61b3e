"""Multiplicative depth of a polynomial graph under CKKS, with networkx.

Conventions (what costs a level, i.e. one rescale):
- ciphertext × ciphertext ``Mul`` / ``MatMul`` / ``Gemm``: 1 level above the deeper input;
- ciphertext × plaintext multiplication (weights, non-integer scalars, masks): 1 level;
  multiplying by a small integer constant is repeated addition and costs none;
- ``ReduceMean`` is a sum times the plaintext 1/n: 1 level; ``Pow`` by n: ⌈log₂ n⌉ levels;
- additions, subtractions, negation, constants, ``ReduceSum`` (rotations) and static data
  movement cost nothing;
- plaintext-only computation (weights, masks, positions, token lookup) is client-side and free.

The report gives per node the levels it consumes and its cumulative level, the critical path,
the number of ciphertext×ciphertext and ciphertext×plaintext multiplications, the CKKS
parameters that fit the depth, and — under a level budget — where bootstrapping is needed.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import numpy as np
import onnx_ir as ir

from txcompile.graph.ckks import ciphertext_values
from txcompile.graph.constants import constant_array, is_constant

if TYPE_CHECKING:
    import networkx as nx

# Largest total coefficient-modulus bits per ring degree at 128-bit security (HE standard).
MAX_BITS = {4096: 109, 8192: 218, 16384: 438, 32768: 881}
SPECIAL_BITS = 60


def _free_integer(value: ir.Value) -> bool:
    if not is_constant(value):
        return False
    array = constant_array(value)
    return array.size > 0 and bool(np.all(array == np.round(array))) and bool(np.all(np.abs(array) <= 8))


def node_levels(graph: ir.Graph) -> tuple[dict[ir.Value, int], dict[ir.Node, dict[str, Any]]]:
    """Level of every ciphertext value; per ciphertext node its cost and multiplication kind."""
    encrypted = ciphertext_values(graph)
    level: dict[ir.Value, int] = {v: 0 for v in graph.inputs if v in encrypted}
    info: dict[ir.Node, dict[str, Any]] = {}
    for node in graph:
        ct_inputs = [v for v in node.inputs if v is not None and v in encrypted and v in level]
        start = {v for v in node.outputs if v in encrypted}
        if not ct_inputs:
            for v in start:
                level[v] = 0  # an encryption point
            continue
        base = max(level[v] for v in ct_inputs)
        cost, kind = 0, None
        op = node.op_type
        if op in ("Mul", "MatMul", "Gemm"):
            plain = [v for v in node.inputs[:2] if v is not None and v not in encrypted]
            if len(ct_inputs) >= 2 and not plain:
                cost, kind = 1, "ct×ct"
            elif not (op == "Mul" and plain and _free_integer(plain[0])):
                cost, kind = 1, "ct×pt"
        elif op in ("Div", "ReduceMean"):
            cost, kind = 1, "ct×pt"
        elif op == "Pow" and is_constant(node.inputs[1]):
            exponent = int(np.max(constant_array(node.inputs[1])))
            cost, kind = max(0, math.ceil(math.log2(max(exponent, 1)))), "ct×ct"
        for v in node.outputs:
            level[v] = base + cost
        deepest = max(ct_inputs, key=lambda v: level[v] if v is not node.inputs[0] else level[v] + 0.5)
        info[node] = {"cost": cost, "kind": kind, "level": base + cost, "from": deepest}
    return level, info


def depth_graph(graph: ir.Graph) -> nx.DiGraph:
    """Ciphertext nodes as a DAG, edges weighted by the consumer's level cost."""
    import networkx as nx  # imported here: only the he target needs it, and it takes 0.3 s

    _, info = node_levels(graph)
    dag = nx.DiGraph()
    for node, data in info.items():
        dag.add_node(node.name, op=node.op_type, **{k: v for k, v in data.items() if k != "from"})
        for value in node.inputs:
            producer = value.producer() if value is not None else None
            if producer is not None and producer in info:
                dag.add_edge(producer.name, node.name, weight=data["cost"])
    return dag


def suggest_ckks(depth: int, scale_bits: int = 40) -> dict[str, Any] | None:
    """Smallest ring with 128-bit security for ``depth`` rescales at 2^scale_bits, or None."""
    bits = [SPECIAL_BITS, *([scale_bits] * depth), SPECIAL_BITS]
    for degree, limit in MAX_BITS.items():
        if sum(bits) <= limit:
            return {
                "poly_modulus_degree": degree,
                "coeff_mod_bit_sizes": bits,
                "total_bits": sum(bits),
                "global_scale": f"2^{scale_bits}",
                "security": "128-bit (HE standard)",
            }
    return None


def depth_report(model: ir.Model, budget: int | None = None, scale_bits: int = 40) -> dict[str, Any]:
    import networkx as nx

    graph = model.graph
    level, info = node_levels(graph)
    outputs = [v for v in graph.outputs if v in level]
    depth = max((level[v] for v in outputs), default=0)
    dag = depth_graph(graph)
    critical = nx.dag_longest_path(dag, weight="weight") if dag.number_of_nodes() else []
    report: dict[str, Any] = {
        "depth": depth,
        "conventions": "ct×ct and ct×plaintext multiplications cost 1 level; additions, sums, "
        "integer scalars and data movement cost 0; ReduceMean 1; Pow n ⌈log2 n⌉",
        "multiplications": {
            "ct×ct": sum(1 for d in info.values() if d["kind"] == "ct×ct"),
            "ct×pt": sum(1 for d in info.values() if d["kind"] == "ct×pt"),
        },
        "critical_path": [
            {"node": n, "op": dag.nodes[n]["op"], "level": dag.nodes[n]["level"]} for n in critical
        ],
        "nodes": {n.name: {"op": n.op_type, "cost": d["cost"], "level": d["level"]} for n, d in info.items()},
        "ckks": suggest_ckks(depth, scale_bits),
        "budget": budget,
    }
    if budget is not None and depth > budget:
        frontier = [
            node.name
            for node, d in info.items()
            if d["level"] > budget and all(level.get(v, 0) <= budget for v in node.inputs if v in level)
        ]
        report["bootstrapping"] = {
            "needed": True,
            "refreshes_on_critical_path": math.ceil(depth / budget) - 1,
            "first_refresh_before": frontier[:20],
            "sites": len(frontier),
        }
    return report
