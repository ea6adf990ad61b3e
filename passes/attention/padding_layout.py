"""Which values hold one row per real-or-padded token, and which nodes work token by token.

remove-padding may pack a value ([B, S, ...] → [T, ...]) only if every row is one token of the
mask's rows, and may run a node on packed values only if each output row depends on the same
input row alone. Both are read from the values probed on the verification inputs, so the
verdicts are facts about this graph, not guesses from op names alone.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from txcompile.graph.nodes import MS_DOMAIN, op_key
from txcompile.passes.attention.gqa import BLOCKED

MS = MS_DOMAIN
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
    "Attention": ((0, 1, 2), (4, 5, 6), 3, None),  # ONNX's, over [B, S, hidden]: the CPU's int8 form
}
USABLE = ("pure", "blocked")  # attention verdicts that let a site run on real tokens


class TokenLayout:
    """The probed values, the mask's rows and the values computed over other rows."""

    def __init__(self, graph: ir.Graph, values: dict, keep: np.ndarray, mask: ir.Value):
        self.values = values
        self.rows = keep.shape
        self.foreign = _other_rows(graph, mask)

    def attention_verdict(self, node: ir.Node, keep: np.ndarray) -> str:
        """ "pure" (bias is exactly the key padding), "blocked" (padded keys blocked, more added),
        or why the site cannot run on packed tokens."""
        hidden, ruled_out, bias_at, _ = ATTENTION[op_key(node)]
        if any(i < len(node.inputs) and node.inputs[i] is not None for i in ruled_out):
            return "has a mask-index or past-state input"
        if any(o.uses() or o.is_graph_output() for o in node.outputs[1:]):
            return "returns present state"
        rows = [self.rows_of(v) for v in (*(node.inputs[i] for i in hidden), node.outputs[0])]
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
        in_op = any(node.attributes.get_int(a, 0) for a in ("unidirectional", "do_rotary", "is_causal"))
        return "pure" if np.all(real[~pads] == 0) and not in_op else "blocked"  # packed ops: no causal/rotary

    def rows_of(self, value: ir.Value | None) -> tuple[int, ...] | None:
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
        data = data_inputs(node)
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

    def seeds(self, attention: list[ir.Node]) -> set[ir.Value]:
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
            sources = data_inputs(producer) if producer is not None else []
            per_token = all(self.layout(v) is not None for v in sources)
            if sources and per_token and self.token_wise(producer, set(sources)):
                stack.extend(sources)
            else:
                seeds.add(value)
        return seeds


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
        data = data_inputs(node)
        if len(data) != 1 or op_key(node) not in {"MatMul", "Gemm", "Reshape", "Split", *ELEMENTWISE}:
            break
        value = data[0]
    return value


def data_inputs(node: ir.Node) -> list[ir.Value]:
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
