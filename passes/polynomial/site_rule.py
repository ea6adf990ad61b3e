"""The shape every polynomial rule shares: sites of its kinds, plaintext left alone.

A rule takes the sites of its ``kinds`` (found once, by :func:`.sites.find_sites`). ``check``
leaves a plaintext site (nothing to approximate: the reason is recorded) and raises
:class:`TxError` where the HE contract cannot be met (``contract``): a non-linearity left on
ciphertext would make the graph unusable, so that is an error, not an unfused site.
``rewrite`` emits the scheme and returns what the report says about it.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import ClassVar

import onnx_ir as ir

from txcompile.graph.build import GraphBuilder
from txcompile.passes.rules import Rewrite, Rule

from .sites import Site
from .state import PolyState

PLAINTEXT = "plaintext input: no ciphertext reaches it, so it stays as it is"


class SiteRule(Rule):
    kinds: ClassVar[tuple[str, ...]]
    modes: ClassVar[tuple[str, ...]] = ("approx", "power-softmax")  # the --he-mode values it serves
    prefix: ClassVar[str] = "poly"  # node names: {site}/{prefix}/{op}_{k}

    def match(self, model: ir.Model, state: PolyState) -> Iterable[Site]:
        if state.mode in self.modes:
            yield from (s for s in state.sites if s.kind in self.kinds)

    def site_name(self, site: Site) -> str:
        return site.node.name or site.node.outputs[0].name or site.node.op_type

    def label(self, site: Site) -> str:
        """The rule name a site gets in rule_counts, node metadata and its record."""
        return self.name

    def kind(self, site: Site) -> str:
        """The non-linearity, as the report groups sites (``per_nonlinearity``)."""
        return site.kind

    def check(self, site: Site, state: PolyState) -> str | None:
        if not site.encrypted:
            return PLAINTEXT
        self.contract(site, state)
        return None

    def contract(self, site: Site, state: PolyState) -> None:
        """Raise TxError when this encrypted site cannot become a polynomial."""

    def rewrite(self, model: ir.Model, site: Site, state: PolyState) -> Rewrite:
        b = state.builder(site, self.prefix)
        out, facts = self.emit(site, state, b)
        nodes = state.finish(site, b, out)
        label = self.label(site)
        return Rewrite(site.node.op_type, nodes, {"kind": self.kind(site), **facts}, rule=label)

    def emit(self, site: Site, state: PolyState, b: GraphBuilder) -> tuple[ir.Value, dict]:
        """Build the scheme with ``b``; return its output and the site's facts."""
        raise NotImplementedError
