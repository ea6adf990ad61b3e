"""Fuse the BERT-family embedding block into ``com.microsoft.EmbedLayerNormalization``.

The block sums two or three embedding lookups (words, positions, token types) and normalizes:
LayerNorm(Gather(W, ids) + Gather(P, positions) [+ Gather(T, types)]); after ``fuse-norms`` it
is a LayerNormalization or a SkipLayerNormalization over those sums. It becomes one node that
gathers, adds and normalizes in one pass over the hidden states.

Every lookup keeps the indices the graph computes (cast to int32, which the op takes), so
positions computed from a buffer, RoBERTa's padding-aware positions and token types built from
a buffer all stay exactly what they were. Run after ``fuse-norms``.
"""

from __future__ import annotations

import dataclasses
import itertools

import numpy as np
import onnx_ir as ir
import onnx_ir.passes.common as common

from txcompile.graph.probe import Shapes, probe_shapes
from txcompile.passes.base import TxPass

MS_DOMAIN = "com.microsoft"
NORMS = {("", "LayerNormalization"), (MS_DOMAIN, "SkipLayerNormalization")}


@dataclasses.dataclass
class Lookup:
    gather: ir.Node
    table: np.ndarray
    unsqueeze: ir.Node | None = None  # Unsqueeze(Gather(P, arange(S)), 0), as plain torch writes positions

    @property
    def ids(self) -> ir.Value:
        return self.gather.inputs[1]

    def ids_shape(self, shapes: Shapes) -> tuple[int, ...] | None:
        """The index shape the fused op sees: Gather(P, ids)[None] = Gather(P, ids[None])."""
        shape = shapes(self.ids)
        return None if shape is None else (1, *shape) if self.unsqueeze else tuple(shape)


@dataclasses.dataclass
class Site:
    norm: ir.Node
    lookups: list[Lookup]
    adds: list[ir.Node]
    total: ir.Value | None  # the embedding sum, when something besides the norm reads it
    reason: str | None = None


class FuseEmbedLayerNorm(TxPass):
    name = "fuse-embed-layernorm"
    summary = "LayerNorm(sum of 2–3 embedding lookups) → com.microsoft.EmbedLayerNormalization (BERT family)"

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        sites = [site for node in model.graph if (site := match(node)) is not None]
        values = [lookup.ids for site in sites for lookup in site.lookups]
        shapes = Shapes(probe_shapes(model, values, self.context.feeds) if sites else {})
        records = []
        for site in sites:
            roles = None if site.reason else assign_roles(site, shapes)
            if roles is None and site.reason is None:
                site.reason = "the lookups' index shapes do not fit (ids [B, S], positions [1|B, S])"
            if site.reason is None:
                self._fuse(model, site, roles, shapes)
            records.append(
                {
                    "node": site.norm.name,
                    "status": "unfused" if site.reason else "fused",
                    "reason": site.reason,
                }
            )
        fused = sum(r["status"] == "fused" for r in records)
        if fused:
            model.opset_imports.setdefault(MS_DOMAIN, 1)
            common.RemoveUnusedNodesPass()(model)
            model.graph.sort()  # readers of the embedding sum may sit before the norm
        self.details = {"sites": records, "fused": fused, "unfused": len(records) - fused}
        return ir.passes.PassResult(model, bool(fused))

    def _fuse(self, model: ir.Model, site: Site, roles: dict[str, Lookup], shapes: Shapes) -> None:
        graph, nodes = model.graph, []

        def node(op: str, inputs, attributes=None, domain: str = "", outputs: int = 1) -> list[ir.Value]:
            created = ir.node(op, inputs, attributes or {}, domain=domain, num_outputs=outputs)
            nodes.append(created)
            return list(created.outputs)

        def int32(value: ir.Value) -> ir.Value:
            if value.dtype == ir.DataType.INT32:
                return value
            return node("Cast", [value], {"to": ir.DataType.INT32})[0]

        def const(lookup: Lookup | None) -> ir.Value | None:
            return None if lookup is None else lookup.gather.inputs[0]

        word, position, segment = roles["word"], roles["position"], roles.get("segment")
        positions = position.ids
        if position.unsqueeze is not None or len(shapes(positions)) == 1:  # [S]: the op takes [1, S]
            axes = ir.val(f"txcompile_{site.norm.name}_axes", const_value=ir.tensor(np.array([0], np.int64)))
            graph.register_initializer(axes)
            positions = node("Unsqueeze", [positions, axes])[0]
        gamma, beta = site.norm.inputs[2], site.norm.inputs[3] if len(site.norm.inputs) > 3 else None
        if site.norm.op_type == "LayerNormalization":
            gamma, beta = site.norm.inputs[1], site.norm.inputs[2] if len(site.norm.inputs) > 2 else None
        if beta is None:
            zeros = ir.tensor(np.zeros(word.table.shape[1], np.float32))
            beta = ir.val(f"txcompile_{site.norm.name}_beta", const_value=zeros)
            graph.register_initializer(beta)
        epsilon = site.norm.attributes.get_float("epsilon", 1e-5)
        inputs = [
            int32(word.ids),
            int32(segment.ids) if segment else None,
            const(word),
            const(position),
            const(segment),
            gamma,
            beta,
            None,  # mask: the attention fusion builds its own bias from the attention mask
            int32(positions),
        ]
        output, _, total = node(
            "EmbedLayerNormalization", inputs, {"epsilon": epsilon}, domain=MS_DOMAIN, outputs=3
        )
        graph.insert_before(site.norm, nodes)
        self.tag(nodes, "embed-layer-norm")
        hidden = word.table.shape[1]
        readers = [(lookup.gather.outputs[0], lookup.ids) for lookup in site.lookups]
        readers += [(site.total, word.ids)] if site.total is not None else []
        for value, ids in readers:
            self.tag(_reshape_readers(graph, value, ids, hidden), "embed-shape-readers")
        self.rule_counts["embed-layer-norm"] += 1
        ir.convenience.replace_all_uses_with(site.norm.outputs[0], output)
        if site.total is not None:
            for user, index in list(site.total.uses()):
                if user is not site.norm:
                    user.replace_input_with(index, total)


def match(norm: ir.Node) -> Site | None:
    """The lookups summed into ``norm``, or None when it normalizes anything else."""
    if (norm.domain if norm.domain != "ai.onnx" else "", norm.op_type) not in NORMS:
        return None
    if norm.op_type == "LayerNormalization":
        if norm.attributes.get_int("axis", -1) != -1:
            return None
        unused, summed = norm.outputs[1:], [norm.inputs[0]]
        total = norm.inputs[0]  # also read by the residual path in Pre-LN models (GPT-2)
    else:
        if len(norm.inputs) > 4 and norm.inputs[4] is not None:
            return None  # a bias input: not an embedding sum
        unused, summed = norm.outputs[1:3], list(norm.inputs[:2])
        total = norm.outputs[3] if len(norm.outputs) > 3 else None
    if any(out.uses() or out.is_graph_output() for out in unused):
        return None
    lookups, adds = [], []
    pending = list(summed)
    while pending:
        value = pending.pop()
        producer = value.producer() if value is not None else None
        if producer is None:
            return None
        if producer.op_type == "Add" and producer.domain in ("", "ai.onnx"):
            adds.append(producer)
            pending.extend(producer.inputs)
        elif (lookup := _lookup(producer)) is not None:
            lookups.append(lookup)
        else:
            return None
    if not 2 <= len(lookups) <= 3 or len({lookup.table.shape[1] for lookup in lookups}) != 1:
        return None
    read_elsewhere = total is not None and _read_elsewhere(total, norm)
    site = Site(norm, lookups, adds, total if read_elsewhere else None)
    inner = [a.outputs[0] for a in adds if a.outputs[0] is not site.total]
    shared_lookup = any(
        len(_value_users(lookup.gather)) != 1
        or lookup.gather.outputs[0].is_graph_output()
        or (lookup.unsqueeze is not None and len(lookup.unsqueeze.outputs[0].uses()) != 1)
        for lookup in lookups
    )
    if shared_lookup or any(len(value.uses()) != 1 or value.is_graph_output() for value in inner):
        site.reason = "an intermediate value has another consumer"
    elif site.total is not None and site.total.is_graph_output():
        site.reason = "the embedding sum is a graph output"
    elif any(lookup.table.dtype != np.float32 for lookup in lookups):
        site.reason = "the embedding tables are not float32"
    return site


def _lookup(node: ir.Node) -> Lookup | None:
    """Gather(table, ids) from a constant 2-D table, possibly under Unsqueeze(axes=[0])."""
    unsqueeze = None
    if node.op_type == "Unsqueeze" and node.domain in ("", "ai.onnx"):
        axes = ir.convenience.get_const_tensor(node.inputs[1]) if len(node.inputs) > 1 else None
        if (
            axes is None
            or [int(a) for a in axes.numpy().reshape(-1)] != [0]
            or node.inputs[0].producer() is None
        ):
            return None
        unsqueeze, node = node, node.inputs[0].producer()
    if (
        node.op_type != "Gather"
        or node.domain not in ("", "ai.onnx")
        or node.attributes.get_int("axis", 0) != 0
    ):
        return None
    table = ir.convenience.get_const_tensor(node.inputs[0])
    if table is None or len(table.shape) != 2:
        return None
    return Lookup(node, table.numpy(), unsqueeze)


def _read_elsewhere(value: ir.Value, norm: ir.Node) -> bool:
    """Whether anything but ``norm`` reads ``value``."""
    return value.is_graph_output() or any(user is not norm for user, _ in value.uses())


def _value_users(gather: ir.Node) -> list[ir.Node]:
    """Users that read the lookup's values; Shape readers (TorchScript takes the sequence length
    from the embedded tensor) are rebuilt from the indices' shape instead."""
    return [user for user, _ in gather.outputs[0].uses() if user.op_type != "Shape"]


def _reshape_readers(graph: ir.Graph, value: ir.Value, ids: ir.Value, hidden: int) -> list[ir.Node]:
    """Shape(value) = Shape(ids) + [hidden] for an embedding (sum) gathered by ``ids``: rewire
    Shape readers to the indices, so they neither keep the unfused lookups alive nor read the
    fused node's output before it exists."""
    created = []
    for user, _ in list(value.uses()):
        if user.op_type != "Shape":
            continue
        ids_shape = ir.node("Shape", [ids])
        width = ir.val(f"txcompile_{user.name}_hidden", const_value=ir.tensor(np.array([hidden], np.int64)))
        graph.register_initializer(width)
        full = ir.node("Concat", [ids_shape.outputs[0], width], {"axis": 0})
        nodes = [ids_shape, full]
        start, end = user.attributes.get_int("start", 0), user.attributes.get_int("end", None)
        result = full.outputs[0]
        if start != 0 or end is not None:
            bounds = [np.array([start], np.int64), np.array([end if end is not None else 2**62], np.int64)]
            values = []
            for i, bound in enumerate(bounds):
                value = ir.val(f"txcompile_{user.name}_bound{i}", const_value=ir.tensor(bound))
                graph.register_initializer(value)
                values.append(value)
            sliced = ir.node("Slice", [result, *values])
            nodes.append(sliced)
            result = sliced.outputs[0]
        graph.insert_before(user, nodes)
        ir.convenience.replace_all_uses_with(user.outputs[0], result)
        created += nodes
    return created


def assign_roles(site: Site, shapes: Shapes) -> dict[str, Lookup] | None:
    """word (ids [B, S]), position (ids [1|B, S] or [S]), segment (ids shaped like word's).

    The sum is the same whichever lookup plays which role; the op only needs the index shapes
    to fit. Larger tables are tried as the word table first.
    """
    ordered = sorted(site.lookups, key=lambda lookup: -lookup.table.shape[0])
    for word, position, *others in itertools.permutations(ordered):
        word_shape, position_shape = word.ids_shape(shapes), position.ids_shape(shapes)
        if word_shape is None or len(word_shape) != 2 or position_shape is None:
            continue
        if tuple(position_shape) not in ((word_shape[1],), (1, word_shape[1]), tuple(word_shape)):
            continue
        if all(other.ids_shape(shapes) == word_shape for other in others):
            return {"word": word, "position": position} | ({"segment": others[0]} if others else {})
    return None
