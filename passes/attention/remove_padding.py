"""Remove padding: run an encoder's per-token work on the real tokens only.

An encoder fed an attention mask spends most of its time in per-token work — projections, MLP,
LayerNorm — and whatever it computes for a padding token is thrown away. This pass gathers the
real tokens once ([B, S, H] → [T, H], T = the mask's ones), runs every token-wise node on them,
and restores the padded layout only where a consumer needs it (graph outputs, pooling, shape
reads), with zeros at the padded positions. Attention is the one place tokens meet:

- target gpu: ``PackedAttention`` / ``PackedMultiHeadAttention`` read the packed tokens
  directly, with token offsets and cumulative lengths computed once from the mask (the
  padding-free idea of ByteTransformer, on ORT's CUDA kernels);
- otherwise (the CPU has no packed attention kernel), the attention op runs on the restored
  layout and its output is packed again, so only the per-token work is saved.

A site qualifies only when its additive bias, evaluated on the verification inputs, blocks every
padded key of every real query (the packed kernels also need it to add nothing else, since
they take the padding from the lengths). The graph's padded outputs hold zeros at padded
positions; the model records which (``txcompile.padded_outputs``) so verification compares real
tokens only. On by default for ``--target gpu`` where some attention site fits the packed
kernels (encoders); ``--remove-padding`` asks for it anywhere, the CPU included.
"""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import onnx_ir as ir

from txcompile.graph.nodes import op_key
from txcompile.graph.ort import PADDED_OUTPUTS_KEY
from txcompile.graph.probe import probe_values
from txcompile.passes.attention.gqa import BLOCKED, padding_input
from txcompile.passes.base import TxPass

MS = "com.microsoft"
# Ops whose output row depends only on the same input row (other operands constant vectors).
ELEMENTWISE = {
    *"Relu Gelu Tanh Sigmoid Erf Neg Sqrt Exp Log Abs Cast Identity Softplus Elu".split(),
    *"LeakyRelu HardSigmoid HardSwish Reciprocal Add Sub Mul Div Pow Max Min".split(),
    *(f"{MS}.{op}" for op in ("Gelu", "FastGelu", "BiasGelu", "QuickGelu")),
}
# Normalizations over the last axis: (outputs that stay per token, outputs that must be unused).
NORMS = {
    "LayerNormalization": ((0,), (1, 2)),
    "RMSNormalization": ((0,), ()),
    "SimplifiedLayerNormalization": ((0,), (1,)),
    f"{MS}.SkipLayerNormalization": ((0, 3), (1, 2)),
    f"{MS}.SkipSimplifiedLayerNormalization": ((0, 3), (1, 2)),
}
# Reductions that stay per token when they run over the last axis only, keeping it.
LAST_AXIS_REDUCTIONS = {"ReduceMean", "ReduceSum", "ReduceSumSquare", "ReduceMax", "ReduceMin", "ReduceL2"}
# Attention ops: (hidden inputs, inputs that rule packing out — mask index, past state —,
# additive-bias input, the packed op for the GPU).
ATTENTION = {
    f"{MS}.Attention": ((0,), (3, 4, 6), 5, "PackedAttention"),
    f"{MS}.MultiHeadAttention": ((0, 1, 2), (4, 6, 7, 8, 9), 5, "PackedMultiHeadAttention"),
}
USABLE = ("pure", "blocked")  # attention verdicts that let a site run on real tokens
PACKED_ATTRIBUTES = {
    "PackedAttention": ("num_heads", "qkv_hidden_sizes", "scale"),
    "PackedMultiHeadAttention": ("num_heads", "scale", "mask_filter_value"),
}


@dataclasses.dataclass(frozen=True)
class RemovePaddingOptions:
    remove_padding: bool | None = None  # None: on for the gpu target's encoders


class RemovePadding(TxPass):
    name = "remove-padding"
    summary = "per-token work on real tokens only (outputs 0 at padding); packed attention on the GPU"
    Options = RemovePaddingOptions

    def enabled(self) -> bool:
        asked = self.options.remove_padding
        return asked if asked is not None else self.context.target == "gpu"

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        self.details = {}
        if not self.enabled():
            self.details["note"] = "off (--remove-padding turns it on for this target)"
            return ir.passes.PassResult(model, False)
        mask_name, reason = padding_input(self.context.feeds)
        keep = np.asarray(self.context.feeds[mask_name]) != 0 if mask_name else None
        if reason or keep is None:
            self.details["note"] = reason or "no 2-D attention-mask input"
        elif keep.all():
            self.details["note"] = f"the verification inputs do not pad {mask_name}: cannot check the masks"
        else:
            self._pack(model, mask_name, keep)
        return ir.passes.PassResult(model, bool(self.rule_counts))

    # -----------------------------------------------------------------------------------------

    def _pack(self, model: ir.Model, mask_name: str, keep: np.ndarray) -> None:
        graph = model.graph
        attention = [n for n in graph if op_key(n) in ATTENTION]
        if not attention:
            self.details["note"] = "no fused attention op"
            return
        values = [*graph.inputs, *(v for n in graph for v in n.outputs if v.name)]
        self.values = probe_values(model, values, self.context.feeds)
        self.rows = keep.shape
        mask = next(v for v in graph.inputs if v.name == mask_name)
        self.foreign = _other_rows(graph, mask)
        self.verdicts = {n: self._attention_verdict(n, keep) for n in attention}
        plan = _Plan(self)
        plan.walk(graph, self._seeds([n for n, verdict in self.verdicts.items() if verdict in USABLE]))
        if not any(op_key(n) in ("MatMul", "Gemm") for n in plan.region):
            self.details["note"] = "no per-token matrix product would run on real tokens only"
            return
        if self.options.remove_padding is None and not plan.packed_attention:
            # the gpu default is for encoders: a decoder's causal attention would swap layouts twice a layer
            self.details["note"] = (
                "no attention site fits the packed kernels (--remove-padding forces the rest)"
            )
            return
        sites = {n.name: self._site_status(n, plan) for n in attention}
        _Rewriter(self, model, mask).apply(plan)
        self.details.update(
            mask=mask_name,
            real_tokens=f"{int(keep.sum())} of {keep.size} in the verification inputs",
            nodes_on_real_tokens=len(plan.region),
            attention=sites,
            padded_layout_for=sorted(f"{op_key(u)} {u.name}".strip() for u in plan.boundary_users),
        )

    def _site_status(self, node: ir.Node, plan: _Plan) -> str:
        if node in plan.packed_attention:
            return "packed op"
        if node in plan.restored_attention:
            return "restored layout"
        verdict = self.verdicts[node]
        return "its inputs are not on real tokens" if verdict in USABLE else verdict

    def _attention_verdict(self, node: ir.Node, keep: np.ndarray) -> str:
        """ "pure" (bias is exactly the key padding), "blocked" (padded keys blocked, more added),
        or why the site cannot run on packed tokens."""
        hidden, ruled_out, bias_at, _ = ATTENTION[op_key(node)]
        if any(i < len(node.inputs) and node.inputs[i] is not None for i in ruled_out):
            return "has a mask-index or past-state input"
        if any(o.uses() or o.is_graph_output() for o in node.outputs[1:]):
            return "returns present state"
        rows = [self._rows_of(v) for v in (*(node.inputs[i] for i in hidden), node.outputs[0])]
        if any(r is None or len(r) != 1 for r in rows):
            return "queries or keys are not [B, S, hidden] over the mask's rows"
        if len({_origin(node.inputs[i]) for i in hidden}) > 1:
            return "cross-attention: queries and keys come from different sequences"
        bias = node.inputs[bias_at] if len(node.inputs) > bias_at else None
        if bias is None or bias.name not in self.values:
            return "no additive mask: padded keys would be attended"
        total = np.asarray(self.values[bias.name], np.float64)
        if total.ndim != 4:
            return "bias is not [B, N, S, L]"
        batch, seq = self.rows
        try:
            total = np.broadcast_to(total, (batch, total.shape[1], seq, seq))
        except ValueError:
            return "bias is not over the mask's rows and keys"
        by_query = total.transpose(0, 2, 1, 3)  # [B, S, N, L]
        padded_key = np.broadcast_to(~keep[:, None, None, :], by_query.shape)
        real, pads = by_query[keep], padded_key[keep]  # real query rows only: padded ones are dropped
        if not np.all(real[pads] <= BLOCKED):
            return "bias does not block every padded key"
        in_op = node.attributes.get_int("unidirectional", 0) or node.attributes.get_int("do_rotary", 0)
        return "pure" if np.all(real[~pads] == 0) and not in_op else "blocked"  # packed ops: no causal/rotary

    def _rows_of(self, value: ir.Value | None) -> tuple[int, ...] | None:
        """The per-token tail shape when ``value`` is [B, S, ...] over the mask's rows."""
        found = self.layout(value)
        return found[0] if found is not None and not found[1] else None

    def layout(self, value: ir.Value | None) -> tuple[tuple[int, ...], bool] | None:
        """(per-token tail shape, flat) when ``value`` holds one row per token of the mask's rows:
        [B, S, ...], or [B·S, ...] as exporters flatten it around Gemm (flat)."""
        if value is None or value.name not in self.values or value in self.foreign:
            return None
        shape = np.shape(self.values[value.name])
        if len(shape) >= 3 and tuple(shape[:2]) == self.rows:
            return tuple(shape[2:]), False
        return (tuple(shape[1:]), True) if len(shape) >= 2 and shape[0] == np.prod(self.rows) else None

    def token_wise(self, node: ir.Node, packed) -> bool:
        """Can ``node`` run on packed tokens, its ``packed`` inputs being [T, ...]?"""
        key = op_key(node)
        data = _data_inputs(node)
        if not data or not all(v in packed for v in data):
            return False
        constants = (
            [v for v in node.inputs[1:] if v is not None and v not in data] if key != "Reshape" else []
        )
        vectors = all(_constant_rank(v) in (0, 1) for v in constants)
        if key == "MatMul":
            ok = data == [node.inputs[0]] and _constant_rank(node.inputs[1]) == 2
        elif key == "Gemm":
            flat = self.layout(node.inputs[0])[1]  # Gemm is 2-D: [B·S, K]
            ok = data == [node.inputs[0]] and flat and not node.attributes.get_int("transA", 0)
            ok = (
                ok
                and _constant_rank(node.inputs[1]) == 2
                and all(_constant_rank(v) in (0, 1) for v in constants[1:])
            )
        elif key in ("Reshape", *ELEMENTWISE):
            ok = vectors  # Reshape: the probe below says it keeps one row per token
        elif key in NORMS:
            unused = NORMS[key][1]
            ok = vectors and self._is_last(node.attributes.get_int("axis", -1), node.inputs[0])
            ok = ok and all(i >= len(node.outputs) or not node.outputs[i].uses() for i in unused)
        elif key == "Split":  # Q, K, V out of one packed projection
            ok = vectors and self._is_last(node.attributes.get_int("axis", 0), node.inputs[0])
        elif key in LAST_AXIS_REDUCTIONS:
            axes = _reduced_axes(node)
            ok = axes is not None and len(axes) == 1 and self._is_last(axes[0], node.inputs[0])
            ok = ok and bool(node.attributes.get_int("keepdims", 1))
        else:
            return False
        outputs = [o for i, o in enumerate(node.outputs) if key not in NORMS or i in NORMS[key][0]]
        return ok and all(self.layout(o) is not None for o in outputs if o.uses() or o.is_graph_output())

    def _is_last(self, axis: int, value: ir.Value) -> bool:
        tail, flat = self.layout(value)
        return axis in (-1, len(tail) + (0 if flat else 1))

    def _seeds(self, attention: list[ir.Node]) -> set[ir.Value]:
        """Where packing starts: walking back from each attention's hidden inputs through
        token-wise nodes, the first per-token values something else produced."""
        seeds, seen = set(), set()
        stack = [n.inputs[i] for n in attention for i in ATTENTION[op_key(n)][0] if n.inputs[i] is not None]
        while stack:
            value = stack.pop()
            if value in seen or self.layout(value) is None:
                continue
            seen.add(value)
            producer = value.producer()
            sources = _data_inputs(producer) if producer is not None else []
            per_token = all(self.layout(v) is not None for v in sources)
            if sources and per_token and self.token_wise(producer, set(sources)):
                stack.extend(sources)
            else:
                seeds.add(value)
        return seeds


class _Plan:
    """Which values get a packed form, which nodes read it, and who needs the padded layout back."""

    def __init__(self, owner: RemovePadding):
        self.owner = owner
        self.layouts: dict[ir.Value, tuple[tuple[int, ...], bool]] = {}  # packed values → (tail, flat)
        self.seeds: set[ir.Value] = set()  # packed by a gather right after their producer
        self.region: list[ir.Node] = []  # nodes that read packed values
        self.packed_attention: set[ir.Node] = set()  # become PackedAttention / PackedMultiHeadAttention
        self.restored_attention: set[ir.Node] = set()  # run on the restored layout
        self.boundary_users: set[ir.Node] = set()

    def walk(self, graph: ir.Graph, seeds: set[ir.Value]) -> None:
        for value in graph.inputs:
            if value in seeds:
                self._seed(value)
        for node in graph:
            self._visit(node)
            for output in node.outputs:
                if output in seeds and output not in self.layouts:
                    self._seed(output)

    def _seed(self, value: ir.Value) -> None:
        self.seeds.add(value)
        self.layouts[value] = self.owner.layout(value)

    def _visit(self, node: ir.Node) -> None:
        owner, key = self.owner, op_key(node)
        verdict = owner.verdicts.get(node)
        data = [node.inputs[i] for i in ATTENTION[key][0]] if verdict else _data_inputs(node)
        if any(v in self.layouts for v in data):  # the rest per token too? gather them as well
            missing = [v for v in data if v not in self.layouts and owner.layout(v) is not None]
            if missing and (verdict in USABLE or owner.token_wise(node, {*self.layouts, *missing})):
                for value in missing:
                    self._seed(value)
        if verdict in USABLE and all(v in self.layouts for v in data):
            self.region.append(node)
            if verdict == "pure" and owner.context.target == "gpu":
                self.packed_attention.add(node)
                self.layouts[node.outputs[0]] = owner.layout(node.outputs[0])
            else:  # runs on the restored layout; its output is packed again
                self.restored_attention.add(node)
                self._seed(node.outputs[0])
        elif owner.token_wise(node, self.layouts):
            self.region.append(node)
            kept = NORMS[key][0] if key in NORMS else range(len(node.outputs))
            for i in kept:
                if i < len(node.outputs) and (node.outputs[i].uses() or node.outputs[i].is_graph_output()):
                    self.layouts[node.outputs[i]] = owner.layout(node.outputs[i])
        elif any(v in self.layouts for v in node.inputs if v is not None):
            self.boundary_users.add(node)


class _Rewriter:
    """Emits the gathers, the packed attention ops and the restores a plan asks for."""

    def __init__(self, owner: RemovePadding, model: ir.Model, mask: ir.Value):
        self.owner, self.model, self.graph, self.mask = owner, model, model.graph, mask
        self.nodes: list[ir.Node] = []
        self._consts = 0
        self._lengths: tuple[ir.Value, ir.Value] | None = None
        self.mask_shape = self.op("Shape", [mask])
        self.index, self.inverse = self._token_index()

    def op(self, op_type: str, inputs, attributes=None, domain: str = "") -> ir.Value:
        node = ir.node(op_type, inputs, attributes or {}, domain=domain)
        self.nodes.append(node)
        return node.outputs[0]

    def const(self, array) -> ir.Value:
        self._consts += 1
        value = ir.val(f"txcompile_padding_c{self._consts}", const_value=ir.tensor(np.asarray(array)))
        self.graph.register_initializer(value)
        return value

    def _token_index(self) -> tuple[ir.Value, ir.Value]:
        """(the real tokens' rows in the flattened [B·S] layout; for each of the B·S rows, its
        packed row — T, one past the last, for a padded one)."""
        flat = self.op("Reshape", [self.mask, self.const(np.array([-1]))])
        keep = self.op("Cast", [flat], {"to": ir.DataType.BOOL})
        index = self.op("Squeeze", [self.op("NonZero", [keep]), self.const(np.array([0]))])
        count = self.op("Shape", [index])
        self.ones = self.op("Cast", [keep], {"to": ir.DataType.INT64})  # [B·S], 1 per real token
        row = self.op(
            "Sub", [self.op("CumSum", [self.ones, self.const(np.array(0))]), self.const(np.array(1))]
        )
        inverse = self.op("Reshape", [self.op("Where", [keep, row, count]), self.mask_shape])
        return index, inverse

    def lengths(self) -> tuple[ir.Value, ir.Value]:
        """(token_offset [B, S], cumulative_sequence_length [B + 1]) as the packed kernels read them:
        the k-th real token of row b goes to b·S + k, as if every row were right-padded. Positions
        are already in the hidden states, so attention does not care which side was padded."""
        if self._lengths is None:
            int32 = ir.DataType.INT32
            real = self.op("Reshape", [self.ones, self.mask_shape])
            counts = self.op("ReduceSum", [real, self.const(np.array([1]))], {"keepdims": 0})
            seq = self.op("Squeeze", [self.op("Shape", [self.mask], {"start": 1, "end": 2})])
            positions = self.op("Range", [self.const(np.array(0)), seq, self.const(np.array(1))])
            row = self.op("Unsqueeze", [positions, self.const(np.array([0]))])
            filled = self.op("Less", [row, self.op("Unsqueeze", [counts, self.const(np.array([1]))])])
            flat = self.op("Reshape", [filled, self.const(np.array([-1]))])
            order = self.op(
                "Concat",
                [self.op("NonZero", [flat]), self.op("NonZero", [self.op("Not", [flat])])],
                {"axis": 1},
            )
            offsets = self.op("Reshape", [self.op("Cast", [order], {"to": int32}), self.mask_shape])
            ends = self.op("CumSum", [self.op("Cast", [counts], {"to": int32}), self.const(np.array(0))])
            starts = self.op("Concat", [self.const(np.array([0], np.int32)), ends], {"axis": 0})
            self._lengths = (offsets, starts)
        return self._lengths

    def pack(self, value: ir.Value, tail: tuple[int, ...], dtype: np.dtype) -> ir.Value:
        flat = self.op("Reshape", [value, self.const(np.array([-1, *tail]))])
        packed = self.op("Gather", [flat, self.index], {"axis": 0})
        _set_packed_type(packed, tail, dtype)
        return packed

    def restore(self, value: ir.Value, layout: tuple[tuple[int, ...], bool], dtype: np.dtype) -> ir.Value:
        """[T, ...] → [B, S, ...] (or [B·S, ...] for a flat value), zeros at the padded positions."""
        tail, flat = layout
        padded = self.op("Concat", [value, self.const(np.zeros((1, *tail), dtype))], {"axis": 0})
        restored = self.op("Gather", [padded, self.inverse], {"axis": 0})
        return self.op("Reshape", [restored, self.const(np.array([-1, *tail]))]) if flat else restored

    def apply(self, plan: _Plan) -> None:
        owner, graph = self.owner, self.graph
        dtypes = {v: np.asarray(owner.values[v.name]).dtype for v in plan.layouts}
        packs = {
            v: self.pack(v, plan.layouts[v][0], dtypes[v])
            for v in sorted(plan.seeds, key=lambda v: v.name or "")
        }
        for node in plan.packed_attention:
            old, new = node.outputs[0], self._packed_attention(node, packs)
            plan.layouts[new], dtypes[new] = plan.layouts.pop(old), dtypes.pop(old)
        restored: dict[ir.Value, ir.Value] = {}

        def padded_form(value: ir.Value) -> ir.Value:
            if value in plan.seeds:
                return value
            if value not in restored:
                restored[value] = self.restore(value, plan.layouts[value], dtypes[value])
            return restored[value]

        for node in plan.boundary_users | plan.restored_attention:
            if node.op_type == "Shape" and node.inputs[0] not in plan.seeds:
                self._padded_shape(node, plan.layouts[node.inputs[0]])
                continue
            for i, value in enumerate(node.inputs):
                if value in plan.layouts:
                    node.replace_input_with(i, padded_form(value))
        owner.rule_counts["attention-on-restored-layout"] += len(plan.restored_attention)
        for node in plan.region:
            if node in plan.restored_attention or node in plan.packed_attention:
                continue
            for i, value in enumerate(node.inputs):
                if value in packs:
                    node.replace_input_with(i, packs[value])
            # the token axes are gone: count the normalized or reduced axis from the end
            if node.op_type in (
                "LayerNormalization",
                "RMSNormalization",
                "SimplifiedLayerNormalization",
                "Split",
            ):
                node.attributes["axis"] = ir.AttrInt64("axis", -1)
            elif node.op_type in LAST_AXIS_REDUCTIONS and len(node.inputs) > 1 and node.inputs[1] is not None:
                node.replace_input_with(1, self.const(np.array([-1])))
            elif node.op_type in LAST_AXIS_REDUCTIONS:
                node.attributes["axes"] = ir.AttrInt64s("axes", [-1])
            elif node.op_type == "Reshape":  # rows stay rows: only the tail is reshaped
                node.replace_input_with(1, self.const(np.array([-1, *plan.layouts[node.outputs[0]][0]])))
            owner.rule_counts["per-token-on-real-tokens"] += 1
        padded_outputs = []  # only these hold zeros at padding; any other change fails verification
        for position, value in enumerate(list(graph.outputs)):
            if value in plan.layouts and value not in plan.seeds:
                padded = padded_form(value)
                padded.name, value.name = value.name, f"{value.name}_real_tokens"
                graph.outputs[position] = padded
                padded_outputs.append(position)
        for value, (tail, _) in plan.layouts.items():
            if value not in plan.seeds:
                _set_packed_type(value, tail, dtypes[value])
        graph.extend(self.nodes)
        graph.sort()
        record = {"mask": self.mask.name, "outputs": padded_outputs}
        self.model.metadata_props[PADDED_OUTPUTS_KEY] = json.dumps(record)
        owner.rule_counts["gather-real-tokens"] += len(packs)
        owner.rule_counts["restore-padding"] += len(restored)

    def _padded_shape(self, node: ir.Node, layout: tuple[tuple[int, ...], bool]) -> None:
        """Shape of a packed value's padded layout, from the mask's shape: nothing restored."""
        tail, flat = layout
        rows = self.mask_shape
        if flat:
            rows = self.op("ReduceProd", [rows], {"keepdims": 1})
        shape = self.op("Concat", [rows, self.const(np.array(tail, np.int64))], {"axis": 0})
        start, end = node.attributes.get_int("start", 0), node.attributes.get_int("end")
        if start != 0 or end is not None:
            bounds = [
                self.const(np.array([start])),
                self.const(np.array([end if end is not None else 2**62])),
            ]
            shape = self.op("Slice", [shape, *bounds])
        ir.convenience.replace_all_uses_with(node.outputs[0], shape, replace_graph_outputs=True)
        self.graph.remove(node, safe=True)

    def _packed_attention(self, node: ir.Node, packs: dict[ir.Value, ir.Value]) -> ir.Value:
        """Attention / MultiHeadAttention on packed tokens, the padding given by the lengths;
        returns the value that now carries the output."""
        key = op_key(node)
        hidden, _, _, packed_op = ATTENTION[key]
        inputs = [packs.get(node.inputs[i], node.inputs[i]) for i in hidden]
        if key == f"{MS}.Attention":
            bias = node.inputs[2] if len(node.inputs) > 2 else None
            if bias is None:  # PackedAttention requires one
                width = self.owner._rows_of(node.outputs[0])[-1]
                sizes = node.attributes.get_ints("qkv_hidden_sizes") or [width] * 3
                dtype = np.asarray(self.owner.values[node.outputs[0].name]).dtype
                bias = self.const(np.zeros(sum(sizes), dtype))
            inputs += [node.inputs[1], bias]
        else:
            inputs += [node.inputs[3] if len(node.inputs) > 3 else None]
        attributes = {
            a: node.attributes[a].value for a in PACKED_ATTRIBUTES[packed_op] if a in node.attributes
        }
        packed = ir.node(
            packed_op, [*inputs, *self.lengths()], attributes, domain=MS, name=f"{node.name}_packed"
        )
        self.nodes.append(packed)
        old, new = node.outputs[0], packed.outputs[0]
        ir.convenience.replace_all_uses_with(old, new, replace_graph_outputs=True)
        new.name, old.name = old.name, f"{old.name}_padded"
        self.graph.remove(node, safe=True)
        self.owner.rule_counts[f"packed-{packed_op}"] += 1
        return new


def _set_packed_type(value: ir.Value, tail: tuple[int, ...], dtype: np.dtype) -> None:
    value.shape = ir.Shape(["txcompile_tokens", *tail])
    value.type = ir.TensorType(ir.DataType.from_numpy(dtype))


SHAPE_ONLY = {"Shape", "Size", "ConstantOfShape", "Range", "EyeLike"}
SHAPED_BY_INPUT = {"Reshape", "Expand", "Tile", "Slice", "Pad", "Resize"}  # later inputs are sizes
# Inputs that share the mask's rows when shapes are static and cannot say so.
MASK_COMPANIONS = {"input_ids", "token_type_ids", "position_ids", "inputs_embeds"}


def _other_rows(graph: ir.Graph, mask: ir.Value) -> set[ir.Value]:
    """Values computed from an input over other rows than the mask's — a decoder's ids, say,
    whose length only happens to equal the mask's in the verification inputs. An input shares
    the mask's rows when its first two dims are the mask's symbolic dims (or, for static
    shapes, when it is one of the mask's usual companions)."""

    def aligned(value: ir.Value) -> bool:
        if value is mask or value.shape is None or len(value.shape) < 2:
            return True
        dims, rows = value.shape.dims[:2], mask.shape.dims[:2] if mask.shape is not None else ()
        if len(rows) != 2 or any(str(a) != str(b) for a, b in zip(dims, rows, strict=True)):
            return False
        return not all(isinstance(d, int) for d in rows) or value.name in MASK_COMPANIONS

    foreign = {v for v in graph.inputs if not aligned(v)}
    for node in graph:
        if node.op_type in SHAPE_ONLY:
            continue  # sizes are not rows (exporters share batch-size arithmetic between streams)
        data = node.inputs[:1] if node.op_type in SHAPED_BY_INPUT else node.inputs
        if any(v in foreign for v in data if v is not None):
            foreign.update(node.outputs)
    return foreign


def _origin(value: ir.Value) -> ir.Value:
    """Where a per-token projection chain (MatMul, bias Add, Reshape, ...) starts: Q, K and V of
    self-attention share it; cross-attention's do not."""
    while (node := value.producer()) is not None:
        data = _data_inputs(node)
        if len(data) != 1 or op_key(node) not in {"MatMul", "Gemm", "Reshape", "Split", *ELEMENTWISE}:
            break
        value = data[0]
    return value


def _data_inputs(node: ir.Node) -> list[ir.Value]:
    """The computed inputs that carry tokens (a Reshape's shape does not: it is rewritten)."""
    if node.op_type == "Reshape":
        return [node.inputs[0]]
    return [v for v in node.inputs if v is not None and _constant_rank(v) is None]


def _reduced_axes(node: ir.Node) -> list[int] | None:
    """A reduction's constant axes (an input since opset 18, an attribute before); None if unknown."""
    if len(node.inputs) > 1 and node.inputs[1] is not None:
        axes = ir.convenience.get_const_tensor(node.inputs[1])
        return None if axes is None else [int(a) for a in axes.numpy().reshape(-1)]
    axes = node.attributes.get_ints("axes")
    return None if axes is None else list(axes)


def _constant_rank(value: ir.Value | None) -> int | None:
    """The rank of a constant input, None for a computed one."""
    if value is None or value.const_value is None:
        return None
    return len(value.const_value.shape)
