"""preln-to-rmsnorm: a Pre-LN transformer's LayerNorms become RMSNorms, exactly.

In a Pre-LN graph every LayerNorm reads the residual stream, and the stream is a sum of
writes: embeddings (token, position, patch conv, class token) and the output projections of
attention and MLP. Centering each writer's weights and bias over the hidden axis makes the
stream zero-mean for every token, so ``LayerNorm(h) == RMSNorm(h) * g + b`` ("Pre-RMSNorm and
Pre-CRMSNorm Transformers", Jiang et al. 2023). LayerNorm shifts ``b`` go into the linear
layers that read the norm when all of them are linear, else into an ``Add`` after it.

The stream is found by walking back from every LayerNorm's input through Add / Concat / Slice /
Transpose / Reshape / Expand to the writers. A write no weight can absorb (Whisper's conv → Gelu
stem, an embedding norm as in Swin) is centered explicitly with ``x - mean(x)`` where it joins
the stream; a LayerNorm whose input is not a sum of writes stays a LayerNorm. The pass refuses
(changing nothing) on Post-LN graphs (a norm reads a stream that began at another norm's output
and its own output begins the next one, as in BERT), when anything but the stream or a
LayerNorm over the centered axis reads a value whose mean it changes, or when tokens are merged
along the hidden axis before a LayerNorm (Swin's patch merging).
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import onnx_ir.passes.common as common

from txcompile.graph.shapes import infer_shapes
from txcompile.passes.base import TxPass
from txcompile.passes.norms import affine as norm_affine
from txcompile.passes.norms.common import (
    NORM_OPS,
    constant,
    describe,
    is_op,
    new_initializer,
    opset_raise_problem,
    raise_opset,
    rank,
    set_constant_input,
)
from txcompile.passes.norms.fuse import fuse_decomposed, unique_node_name

RMS_NORM_OPSET = 23


class Refused(Exception):
    """The graph is not one whose LayerNorms can all become RMSNorms; the message says why."""


class NotCenterable(Refused):
    """A write whose weights cannot absorb the centering; an explicit ``x - mean(x)`` can."""


class StreamCentering:
    """Plans, then applies, the weight edits that make every LayerNorm input zero-mean."""

    def __init__(self) -> None:
        self.edits: list[tuple[ir.Node, int, np.ndarray, str]] = []  # node, input, new value, what
        self.values: dict[int, tuple[ir.Value, int]] = {}  # id → (value, centered axis)
        self.nodes: set[ir.Node] = set()
        self.explicit: list[tuple[ir.Node, int, int, str]] = []  # reader, input, axis, why
        self.norm_starts: set[ir.Node] = set()  # norms whose output begins a stream

    def snapshot(self):
        return len(self.edits), dict(self.values), set(self.nodes), set(self.norm_starts), len(self.explicit)

    def restore(self, snapshot) -> None:
        del self.edits[snapshot[0] :]
        del self.explicit[snapshot[4] :]
        self.values, self.nodes, self.norm_starts = snapshot[1], set(snapshot[2]), set(snapshot[3])

    def plan(self, value: ir.Value, axis: int) -> None:
        """Make ``value`` zero-mean along ``axis`` (non-negative); raise Refused when impossible."""
        seen = self.values.get(id(value))
        if seen is not None:
            if seen[1] != axis:
                raise Refused(f"{value.name} would be centered along two different axes")
            return
        self.values[id(value)] = (value, axis)
        node = value.producer()
        if node is None:
            raise NotCenterable(f"the stream takes graph input {value.name} directly")
        self.nodes.add(node)
        if (node.domain or "", node.op_type) in NORM_OPS:
            self.norm_starts.add(node)
            raise NotCenterable(f"the output of {describe(node)} begins the stream")
        handler = getattr(self, f"_{node.op_type.lower()}", None)
        if node.domain not in ("", "ai.onnx") or handler is None:
            raise NotCenterable(f"{describe(node)} writes into the residual stream and cannot be centered")
        handler(node, value, axis)

    # --- how each producer is centered --------------------------------------------------------

    def _operand(self, node: ir.Node, index: int, axis: int) -> None:
        """An input of a broadcasting op: center constants on this edge, recurse otherwise."""
        value, out = node.inputs[index], node.outputs[0]
        offset = rank(out) - rank(value) if rank(value) is not None and rank(out) is not None else None
        if offset is None:
            raise Refused(f"the rank of {value.name} is unknown")
        own = axis - offset
        if own < 0 or value.shape[own] == 1:
            raise Refused(f"{value.name} is broadcast along the hidden axis into {describe(node)}")
        array = constant(value)
        if array is not None:
            self._edit(node, index, array - array.mean(axis=own, keepdims=True), "constant")
            return
        snapshot = self.snapshot()
        try:
            self.plan(value, own)
        except NotCenterable as why:  # center this write explicitly (Whisper's Gelu stem, Swin's norm)
            starts = self.norm_starts
            self.restore(snapshot)
            self.norm_starts = starts  # Post-LN detection needs to know which norms began a stream
            self.explicit.append((node, index, own, str(why)))

    def _add(self, node, value, axis):
        for index in range(2):
            self._operand(node, index, axis)

    _sub = _add

    def _concat(self, node, value, axis):
        if node.attributes.get_int("axis") % rank(value) == axis:
            # zero-mean parts make a zero-mean whole, but a LayerNorm over the whole (Swin's patch
            # merging) is not invariant to the per-part shifts that centering removes
            raise Refused(f"{describe(node)} concatenates along the hidden axis")
        for index in range(len(node.inputs)):
            self._operand(node, index, axis)

    def _slice(self, node, value, axis):
        """Slicing tokens or positions keeps each token's mean (Swin's roll and patch merging)."""
        starts = constant(node.inputs[1])
        axes = constant(node.inputs[3]) if len(node.inputs) > 3 and node.inputs[3] is not None else None
        if starts is None or (len(node.inputs) > 3 and node.inputs[3] is not None and axes is None):
            raise NotCenterable(f"{describe(node)} slices along unknown axes")
        axes = list(range(starts.size)) if axes is None else [int(a) % rank(value) for a in axes.reshape(-1)]
        if axis in axes:
            raise NotCenterable(f"{describe(node)} slices the hidden axis")
        self.plan(node.inputs[0], axis)

    def _expand(self, node, value, axis):
        self._operand(node, 0, axis)

    def _cast(self, node, value, axis):
        source = node.inputs[0]
        if source.dtype is None or node.attributes.get_int("to") != source.dtype.value:
            raise Refused(f"{describe(node)} changes the stream's type")
        self.plan(source, axis)

    def _identity(self, node, value, axis):
        self.plan(node.inputs[0], axis)

    def _transpose(self, node, value, axis):
        perm = node.attributes.get_ints("perm", None) or list(reversed(range(rank(value))))
        self.plan(node.inputs[0], perm[axis])

    def _reshape(self, node, value, axis):
        source, out = node.inputs[0].shape, value.shape
        if source is None or out is None:
            raise Refused(f"{describe(node)} has unknown shapes")
        if list(source)[: axis + 1] == list(out)[: axis + 1]:
            return self.plan(node.inputs[0], axis)
        if axis == len(out) - 1 and isinstance(out[-1], int) and source[-1] == out[-1]:
            return self.plan(node.inputs[0], len(source) - 1)
        raise Refused(f"{describe(node)} moves the hidden axis")

    def _mul(self, node, value, axis):
        for index in range(2):
            factor = constant(node.inputs[index])
            if factor is not None and factor.size == 1:
                return self.plan(node.inputs[1 - index], axis)
        raise NotCenterable(f"{describe(node)} scales the stream per channel (the mean would not stay zero)")

    def _gather(self, node, value, axis):
        table = constant(node.inputs[0])
        if table is None or table.ndim != 2 or node.attributes.get_int("axis", 0) != 0:
            raise NotCenterable(f"{describe(node)} is not an embedding lookup in a constant table")
        if axis != rank(value) - 1:
            raise Refused(f"{describe(node)} would be centered along its index axis")
        self._edit(node, 0, table - table.mean(axis=1, keepdims=True), "embedding table")

    def _matmul(self, node, value, axis):
        weight = constant(node.inputs[1])
        if weight is None or weight.ndim != 2 or axis != rank(value) - 1:
            raise NotCenterable(f"{describe(node)} writes into the stream with a non-constant weight")
        self._edit(node, 1, weight - weight.mean(axis=1, keepdims=True), "projection weight")

    def _gemm(self, node, value, axis):
        weight = constant(node.inputs[1])
        if weight is None or axis != 1:
            raise NotCenterable(f"{describe(node)} writes into the stream with a non-constant weight")
        columns = 0 if node.attributes.get_int("transB", 0) else 1
        self._edit(node, 1, weight - weight.mean(axis=columns, keepdims=True), "projection weight")
        if len(node.inputs) > 2 and node.inputs[2] is not None:
            self._operand(node, 2, axis)

    def _conv(self, node, value, axis):
        weight = constant(node.inputs[1])
        if weight is None or axis != 1 or node.attributes.get_int("group", 1) != 1:
            raise NotCenterable(f"{describe(node)} is not a plain convolution with constant weights")
        self._edit(node, 1, weight - weight.mean(axis=0, keepdims=True), "convolution weight")
        if len(node.inputs) > 2 and node.inputs[2] is not None:
            bias = constant(node.inputs[2])
            if bias is None:
                raise NotCenterable(f"{describe(node)} has a non-constant bias")
            self._edit(node, 2, bias - bias.mean(), "convolution bias")

    def _edit(self, node: ir.Node, index: int, array: np.ndarray, what: str) -> None:
        self.edits.append((node, index, array.astype(constant(node.inputs[index]).dtype), what))

    # --- checks and application ---------------------------------------------------------------

    def outside_reader(self) -> str | None:
        """A value whose mean changes must be read only by the stream itself or by a LayerNorm."""
        for value, axis in self.values.values():
            if value.is_graph_output():
                return f"{value.name} (residual stream) is a graph output"
            for reader in value.consumers():
                if reader in self.nodes or is_op(reader, "Shape", "Size"):
                    continue
                if _normalizes_axis(reader, value, axis):
                    continue  # a LayerNorm over the centered axis does not see the shift
                return f"{value.name} (residual stream) is also read by {describe(reader)}"
        return None

    def apply(self, graph: ir.Graph) -> list[dict]:
        done = []
        for node, index, array, what in self.edits:
            set_constant_input(node, index, array, graph)
            done.append({"node": node.name or node.op_type, "input": index, "what": what})
        for node, index, axis, why in self.explicit:
            value = node.inputs[index]
            axes = new_initializer(graph, f"{value.name}.axes", np.array([axis], dtype=np.int64))
            mean = ir.node("ReduceMean", [value, axes], {"keepdims": 1}, name=f"{node.name}/center_mean")
            centered = ir.node("Sub", [value, mean.outputs[0]], name=f"{node.name}/center")
            centered.outputs[0].shape, centered.outputs[0].type = value.shape, value.type
            graph.insert_before(node, [mean, centered])
            node.replace_input_with(index, centered.outputs[0])
            done.append(
                {"node": node.name or node.op_type, "input": index, "what": f"explicit x - mean(x): {why}"}
            )
        return done


class PreLnToRmsNorm(TxPass):
    name = "preln-to-rmsnorm"
    summary = "Pre-LN: center every write into the residual stream, then LayerNorm → RMSNorm (exact)"

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        self.details = {"fused": [], "left": [], "converted": [], "centered": [], "refused": None}
        infer_shapes(model)
        fuse_decomposed(model, self, kinds=("layer",))
        try:
            centering, norms = self._plan(model)
        except Refused as why:
            self.details["refused"] = str(why)
            return ir.passes.PassResult(model, bool(self.details["fused"]))
        self.details["centered"] = centering.apply(model.graph)
        self.rule_counts["center-writer"] = len(centering.edits)
        if centering.explicit:
            self.rule_counts["center-explicitly"] = len(centering.explicit)
        note = raise_opset(model, RMS_NORM_OPSET)
        if note:
            self.details["opset"] = note
        for norm in norms:
            self.details["converted"].append(self._convert(model.graph, norm))
        self.rule_counts["layer-norm-to-rms-norm"] = len(norms)
        common.RemoveUnusedNodesPass()(model)
        return ir.passes.PassResult(model, True)

    def _plan(self, model: ir.Model) -> tuple[StreamCentering, list[ir.Node]]:
        """Plan every LayerNorm; those whose input is not a sum of writes stay LayerNorms."""
        graph = model.graph
        if any(n.op_type in ("SkipLayerNormalization", "SkipSimplifiedLayerNormalization") for n in graph):
            raise Refused("the graph has Skip norms already: run preln-to-rmsnorm before fuse-norms")
        norms = [n for n in graph if is_op(n, "LayerNormalization")]
        if not norms:
            raise Refused("no LayerNormalization in the graph (RMSNorm models need no conversion)")
        centering = StreamCentering()
        convert, starts_seen = [], {}
        for norm in norms:
            x = norm.inputs[0]
            if rank(x) is None:
                raise Refused(f"the rank of {x.name} (input of {describe(norm)}) is unknown")
            if norm.attributes.get_int("axis", -1) % rank(x) != rank(x) - 1:
                raise Refused(f"{describe(norm)} normalizes over more than the last axis")
            if any(out.consumers() or out.is_graph_output() for out in norm.outputs[1:]):
                raise Refused(f"{describe(norm)}'s mean / inverse std-dev outputs are read")
            snapshot = centering.snapshot()
            try:
                centering.plan(x, rank(x) - 1)
            except NotCenterable as why:  # its input is not a sum of writes: it stays a LayerNorm
                centering.restore(snapshot)
                self.details["left"].append({"site": norm.name or x.name, "reason": str(why)})
                continue
            except Refused as why:
                raise Refused(f"{describe(norm)}: {why}") from None
            starts_seen[norm] = centering.norm_starts - snapshot[3]
            convert.append(norm)
        for norm, earlier in starts_seen.items():
            if norm in centering.norm_starts and earlier:
                first = describe(next(iter(earlier)))
                raise Refused(
                    f"not Pre-LN: {describe(norm)} reads a stream that begins at the output of {first} "
                    "and its own output begins the next one (Post-LN)"
                )
        problem = centering.outside_reader() or opset_raise_problem(model, RMS_NORM_OPSET)
        if problem or not convert:
            raise Refused(problem or "no LayerNorm reads a residual stream")
        return centering, convert

    def _convert(self, graph: ir.Graph, norm: ir.Node) -> dict:
        """LayerNorm(h, g, b) → RMSNorm(h, g) + b, with b folded into linear readers when it can be."""
        x, gamma = norm.inputs[0], norm.inputs[1]
        beta = constant(norm.inputs[2]) if len(norm.inputs) > 2 and norm.inputs[2] is not None else None
        epsilon = norm.attributes.get_float("epsilon", 1e-5)
        rms = ir.node(
            "RMSNormalization",
            [x, gamma],
            {"axis": -1, "epsilon": epsilon, "stash_type": 1},
            name=unique_node_name(graph, f"{norm.name or 'norm'}/rms"),
        )
        out = norm.outputs[0]
        rms.outputs[0].shape, rms.outputs[0].type = out.shape, out.type
        graph.insert_before(norm, rms)
        shift = "none"
        result = rms.outputs[0]
        if beta is not None and np.any(beta):
            readers, problem = norm_affine.linear_readers(out)
            if problem is None:
                ir.convenience.replace_all_uses_with(out, result, replace_graph_outputs=True)
                norm_affine.fold_into_readers(graph, readers, None, beta)
                shift = f"folded into {len(readers)} linear readers"
            else:
                add = ir.node(
                    "Add", [result, norm.inputs[2]], name=unique_node_name(graph, f"{rms.name}/shift")
                )
                add.outputs[0].shape, add.outputs[0].type = out.shape, out.type
                graph.insert_after(rms, add)
                result = add.outputs[0]
                shift = f"kept as an Add ({problem})"
        ir.convenience.replace_all_uses_with(out, result, replace_graph_outputs=True)
        graph.remove(norm, safe=True)
        self.tag([rms], "layer-norm-to-rms-norm")
        return {"site": norm.name or out.name, "epsilon": epsilon, "shift": shift}


def _normalizes_axis(reader: ir.Node, value: ir.Value, axis: int) -> bool:
    if not is_op(reader, "LayerNormalization") or reader.inputs[0] is not value or rank(value) is None:
        return False
    return axis == rank(value) - 1 and reader.attributes.get_int("axis", -1) % rank(value) == axis
