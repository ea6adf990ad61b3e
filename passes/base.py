"""What every txcompile pass is: an onnx_ir in-place pass that explains itself.

A pass has a name and a one-line summary, says whether it is exact, counts what each of its
rules did, and tags the nodes it creates with the rule's name so reports can say who made
what. The pass manager reads ``rule_counts`` and ``details`` after each run.
"""

from __future__ import annotations

import collections
import dataclasses
from collections.abc import Iterable
from typing import Any, ClassVar

import numpy as np
import onnx_ir as ir

RULE_KEY = "txcompile.rule"
PASS_KEY = "txcompile.pass"


@dataclasses.dataclass
class PassContext:
    """What a pass may know beyond the graph: the target and the verification inputs."""

    target: str = "cpu"
    device: str = "cpu"
    feeds: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)
    options: dict[str, Any] = dataclasses.field(default_factory=dict)


class TxPass(ir.passes.InPlacePass):
    name: ClassVar[str]
    summary: ClassVar[str]
    exact: ClassVar[bool] = True

    def __init__(self, context: PassContext | None = None) -> None:
        super().__init__()
        self.context = context or PassContext()
        self.rule_counts: collections.Counter[str] = collections.Counter()
        self.details: dict[str, Any] = {}

    def tag(self, nodes: Iterable[ir.Node], rule: str) -> None:
        for node in nodes:
            node.metadata_props[RULE_KEY] = rule


def all_nodes(model: ir.Model) -> list[ir.Node]:
    """Every node, subgraphs and functions included."""
    nodes = list(ir.traversal.RecursiveGraphIterator(model.graph))
    for function in model.functions.values():
        nodes.extend(ir.traversal.RecursiveGraphIterator(function))
    return nodes


def op_key(node: ir.Node) -> str:
    """``MatMul`` for the default domain, ``com.microsoft.Attention`` otherwise."""
    return node.op_type if node.domain in ("", "ai.onnx") else f"{node.domain}.{node.op_type}"


def op_histogram(model: ir.Model) -> dict[str, int]:
    counts = collections.Counter(op_key(n) for n in ir.traversal.RecursiveGraphIterator(model.graph))
    return dict(sorted(counts.items()))
