"""What every txcompile pass is: an onnx_ir in-place pass that explains itself.

A pass has a name and a one-line summary, says whether it is exact, counts what each of its
rules did, and tags the nodes it creates with the rule's name so reports can say who made
what. The pass manager reads ``rule_counts`` and ``details`` after each run.

Options are typed: a pass declares an ``Options`` dataclass with defaults, and the CLI's flags
of the same names fill it (a flag left unset keeps the default). Validation that needs no
graph belongs in the dataclass's ``__post_init__``, so a bad flag fails before any work.
"""

from __future__ import annotations

import collections
import dataclasses
from collections.abc import Iterable, Mapping
from typing import Any, ClassVar, TypeVar

import numpy as np
import onnx_ir as ir

from txcompile.graph.nodes import RULE_KEY

T = TypeVar("T")


@dataclasses.dataclass
class PassContext:
    """What a pass may know beyond the graph: the target, the verification inputs, and the
    user's flags by name (each pass reads its own through its ``Options``)."""

    target: str = "cpu"
    device: str = "cpu"
    feeds: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)
    flags: Mapping[str, Any] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class NoOptions:
    """The options of a pass that takes none."""


def fill_options(options_class: type[T], flags: Mapping[str, Any]) -> T:
    """``options_class`` from the flags of its field names; unset (None) flags keep the default."""
    fields = dataclasses.fields(options_class)
    return options_class(**{f.name: flags[f.name] for f in fields if flags.get(f.name) is not None})


class TxPass(ir.passes.InPlacePass):
    name: ClassVar[str]
    summary: ClassVar[str]
    exact: ClassVar[bool] = True
    Options: ClassVar[type] = NoOptions

    def __init__(self, context: PassContext | None = None) -> None:
        super().__init__()
        self.context = context or PassContext()
        self.options = fill_options(self.Options, self.context.flags)
        self.rule_counts: collections.Counter[str] = collections.Counter()
        self.details: dict[str, Any] = {}

    def tag(self, nodes: Iterable[ir.Node], rule: str) -> None:
        for node in nodes:
            node.metadata_props[RULE_KEY] = rule
