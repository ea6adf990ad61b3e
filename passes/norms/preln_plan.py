"""Which LayerNorms of a graph preln-to-rmsnorm converts, and the centering that makes it exact.

Every LayerNorm's input is planned as a sum of writes (stream.py); one whose input is not
(``NotCenterable``) stays a LayerNorm. The graph is refused as a whole when it has Skip norms
already, is Post-LN (a norm reads a stream that began at another norm's output and its own
output begins the next one, as in BERT), or a value whose mean changes has another reader.
"""

from __future__ import annotations

import dataclasses

import onnx_ir as ir

from txcompile.passes.norms.common import describe, is_op, rank
from txcompile.passes.norms.opset import RMS_NORM_OPSET, needs_conversion, opset_raise_problem
from txcompile.passes.norms.stream import NotCenterable, Refused, StreamCentering
from txcompile.passes.norms.writers import WRITERS


@dataclasses.dataclass
class Conversion:
    """The plan: the LayerNorms looked at, why some stay, the centering; or why the graph is refused."""

    norms: list[ir.Node]
    centering: StreamCentering | None = None
    left: dict[ir.Node, str] = dataclasses.field(default_factory=dict)
    refused: str | None = None


def plan_conversion(model: ir.Model) -> Conversion:
    norms = [n for n in model.graph if is_op(n, "LayerNormalization")]
    try:
        return _plan(model, norms)
    except Refused as why:
        return Conversion(norms, refused=str(why))


def _plan(model: ir.Model, norms: list[ir.Node]) -> Conversion:
    graph = model.graph
    if any(n.op_type in ("SkipLayerNormalization", "SkipSimplifiedLayerNormalization") for n in graph):
        raise Refused("the graph has Skip norms already: run preln-to-rmsnorm before fuse-norms")
    if not norms:
        raise Refused("no LayerNormalization in the graph (RMSNorm models need no conversion)")
    plan = Conversion(norms, StreamCentering(WRITERS))
    centering, starts_seen = plan.centering, {}
    for norm in norms:
        _check_norm(norm)
        x = norm.inputs[0]
        snapshot = centering.snapshot()
        try:
            centering.plan(x, rank(x) - 1)
        except NotCenterable as why:  # its input is not a sum of writes: it stays a LayerNorm
            centering.restore(snapshot)
            plan.left[norm] = str(why)
            continue
        except Refused as why:
            raise Refused(f"{describe(norm)}: {why}") from None
        starts_seen[norm] = centering.norm_starts - snapshot[3]
    for norm, earlier in starts_seen.items():
        if norm in centering.norm_starts and earlier:
            first = describe(next(iter(earlier)))
            raise Refused(
                f"not Pre-LN: {describe(norm)} reads a stream that begins at the output of {first} "
                "and its own output begins the next one (Post-LN)"
            )
    problem = centering.outside_reader() or _opset_problem(model)
    if problem or not starts_seen:
        raise Refused(problem or "no LayerNorm reads a residual stream")
    return plan


def _opset_problem(model: ir.Model) -> str | None:
    """Below opset 18 the graph is converted once the plan is made (preln_rmsnorm.py)."""
    return None if needs_conversion(model, RMS_NORM_OPSET) else opset_raise_problem(model, RMS_NORM_OPSET)


def _check_norm(norm: ir.Node) -> None:
    x = norm.inputs[0]
    if rank(x) is None:
        raise Refused(f"the rank of {x.name} (input of {describe(norm)}) is unknown")
    if norm.attributes.get_int("axis", -1) % rank(x) != rank(x) - 1:
        raise Refused(f"{describe(norm)} normalizes over more than the last axis")
    if any(out.consumers() or out.is_graph_output() for out in norm.outputs[1:]):
        raise Refused(f"{describe(norm)}'s mean / inverse std-dev outputs are read")
