"""Fuse every attention site into one op the target runs: com.microsoft.MultiHeadAttention (default)
or the standard ONNX ``Attention`` (opset 23, ``--attention-op onnx``).

Sites come from :mod:`attention_sites` (structure only); heads, head size and sequence lengths
from :mod:`attention_shapes`. For MultiHeadAttention, Q is fed as [B, S, hidden]; K and V as
[B, S, hidden] too when the graph splits them into heads with Reshape+Transpose (then the
projection biases fold into MHA's packed bias), else as [B, N, L, D] — e.g. LLaMA's rotated,
repeated K/V (grouped-query attention is fused with the repeated KV the graph already builds).
Masks and biases become one additive ``attention_bias`` [B|1, N|1, S, L], built once and shared
by every layer that reads the same mask. Every site lands in ``details["sites"]``: fused, with
the op it became, or unfused, with the first check that failed.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import onnx_ir as ir
import onnx_ir.passes.common as common

from txcompile.graph.errors import TxError
from txcompile.graph.probe import Shapes, probe_shapes, probe_values
from txcompile.passes.attention import gqa as gqa
from txcompile.passes.attention.sites import BiasTerm, Site, find_sites
from txcompile.passes.base import TxPass
from txcompile.passes.targets.precision import requested_precision

ATTENTION_OPS = ("ms", "onnx", "gqa")
MS_DOMAIN = "com.microsoft"
ONNX_ATTENTION_OPSET = 23


@dataclasses.dataclass
class Layout:
    """How one site's tensors are shaped: [B, N, S, D] queries against L keys."""

    batch: int
    heads: int
    seq: int
    keys: int
    head_dim: int

    @property
    def hidden(self) -> int:
        return self.heads * self.head_dim


class _Builder:
    """Collects the nodes one fusion creates, with unique names for its constants."""

    def __init__(self, graph: ir.Graph, prefix: str):
        self.graph, self.prefix, self.nodes = graph, prefix, []
        self._count = 0

    def op(self, op_type: str, inputs, attributes=None, domain: str = "") -> ir.Value:
        return self.ops(op_type, inputs, attributes, domain)[0]

    def ops(self, op_type: str, inputs, attributes=None, domain: str = "", outputs: int = 1) -> list:
        node = ir.node(op_type, inputs, attributes or {}, domain=domain, num_outputs=outputs)
        self.nodes.append(node)
        return list(node.outputs)

    def const(self, array: np.ndarray) -> ir.Value:
        self._count += 1
        value = ir.val(f"{self.prefix}_c{self._count}", const_value=ir.tensor(np.asarray(array)))
        self.graph.register_initializer(value)
        return value


def _perm(node: ir.Node | None) -> tuple[int, ...] | None:
    if node is None or node.op_type != "Transpose":
        return None
    perm = node.attributes.get_ints("perm")
    return tuple(perm) if perm is not None else None


def _merged_heads(value: ir.Value, perm: tuple, rows: int, layout: Layout, shapes: Shapes) -> ir.Value | None:
    """x3 when ``value`` is Transpose(perm, Reshape(x3 [B, rows, hidden] → [B, rows, N, D]))."""
    transpose = value.producer()
    if _perm(transpose) != perm:
        return None
    reshape = transpose.inputs[0].producer()
    if reshape is None or reshape.op_type != "Reshape":
        return None
    merged = reshape.inputs[0]
    b, n, d = layout.batch, layout.heads, layout.head_dim
    if shapes(merged) != (b, rows, n * d) or shapes(reshape.outputs[0]) != (b, rows, n, d):
        return None
    return merged


def neighbourhood(site: Site) -> list[ir.Value]:
    """The values whose shapes planning may ask for."""
    values = [site.query, site.key_t, site.value, *(t.value for t in site.biases)]
    for start in (site.query, site.key_t, site.value):
        value = start
        for _ in range(6):
            producer = value.producer() if value is not None else None
            if producer is None or not producer.inputs:
                break
            value = producer.inputs[0]
            values.extend([value, producer.outputs[0]])
    if site.pv is not None:
        output = site.pv.outputs[0]
        values.append(output)
        for _ in range(2):
            uses = output.uses()
            if len(uses) != 1:
                break
            output = uses[0][0].outputs[0]
            values.append(output)
    return [v for v in values if v is not None]


@dataclasses.dataclass(frozen=True)
class AttentionOptions:
    attention_op: str = "ms"  # ms: MultiHeadAttention / Attention; onnx: ONNX Attention; gqa
    precision: str | None = None

    def __post_init__(self) -> None:
        if self.attention_op not in ATTENTION_OPS:
            raise TxError(f"--attention-op {self.attention_op!r}: choose one of {', '.join(ATTENTION_OPS)}")


class FuseAttention(TxPass):
    name = "fuse-attention"
    summary = "fuse every Softmax-between-two-MatMuls site into MultiHeadAttention, ONNX Attention or GQA"
    Options = AttentionOptions

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        op_choice = self.options.attention_op
        graph = model.graph
        opset = model.opset_imports.get("", 1)
        sites = find_sites(graph, opset)
        readable = [s for s in sites if s.reason is None]
        values = [v for s in readable for v in neighbourhood(s)]
        shapes = Shapes(probe_shapes(model, values, self.context.feeds) if readable else {})
        self._bias_cache: dict[tuple, ir.Value] = {}
        self._fallbacks: dict[str, str] = {}
        self._lengths_cache: dict[str, tuple[ir.Value, ir.Value]] = {}
        if op_choice == "gqa":
            terms = [t.value for s in readable for t in s.biases]
            self._mask_values = probe_values(model, terms, self.context.feeds) if terms else {}
            self._padding, self._padding_reason = gqa.padding_input(self.context.feeds)
        records = []
        for index, site in enumerate(sites):
            op = None
            if site.reason is None:
                layout = _layout(site, shapes)
                if site.reason is None:
                    op = self._fuse(model, site, layout, shapes, op_choice, index)
            records.append(_record(site, op, self._fallbacks.get(site.name)))
        fused = sum(r["status"] == "fused" for r in records)
        if fused:
            common.RemoveUnusedNodesPass()(model)
        self.details = {
            "sites": records,
            "fused": fused,
            "unfused": len(records) - fused,
            "attention_op": op_choice,
        }
        return ir.passes.PassResult(model, bool(fused))

    # -----------------------------------------------------------------------------------------

    def _fuse(self, model, site: Site, layout: Layout, shapes: Shapes, op_choice: str, index: int) -> str:
        builder = _Builder(model.graph, f"txcompile_attention_{index}")
        model.opset_imports.setdefault(MS_DOMAIN, 1)
        plan = self._gqa_plan(site, layout, shapes) if op_choice == "gqa" else None
        if op_choice == "onnx":
            op = self._emit_onnx(model, site, layout, shapes, builder)
        elif isinstance(plan, tuple):
            op = self._emit_gqa(model, site, layout, shapes, builder, *plan)
        else:
            if plan is not None:
                self._fallbacks[site.name] = f"not GroupQueryAttention: {plan}"
            op = self._emit_ms(site, layout, shapes, builder)
        model.graph.insert_before(site.pv, builder.nodes)
        return op

    def _emit_ms(self, site: Site, layout: Layout, shapes: Shapes, b: _Builder) -> str:
        n, hidden = layout.heads, layout.hidden
        query = _merged_heads(site.query, (0, 2, 1, 3), layout.seq, layout, shapes)
        if query is None:
            transposed = b.op("Transpose", [site.query], {"perm": [0, 2, 1, 3]})
            query = b.op("Reshape", [transposed, b.const(np.array([0, 0, hidden], np.int64))])
            self.rule_counts["query-merge-heads"] += 1
        key_4d = None
        key = _merged_heads(site.key_t, (0, 2, 3, 1), layout.keys, layout, shapes)
        if key is None:
            key_4d = _untransposed_key(site.key_t, layout, shapes)
        if key_4d is not None:
            key = _merged_heads(key_4d, (0, 2, 1, 3), layout.keys, layout, shapes)
        value = _merged_heads(site.value, (0, 2, 1, 3), layout.keys, layout, shapes)
        packed_bias = None
        if key is not None and value is not None:
            rule = "mha-bsh"
            (query, key, value), packed_bias = self._fold_projection_biases(
                [query, key, value], hidden, b, shapes
            )
            packed = _packed_projection(site, query, key, value, shapes)
            if packed is not None:
                length = b.op("Shape", [packed[0]], {"start": 1, "end": 2})
                attention_bias = self._attention_bias(site, layout, shapes, b, length, length)
                int8 = requested_precision(self.options.precision, self.context.target) == "int8"
                emit = self._emit_packed_matmul if int8 else self._emit_packed
                return emit(site, layout, shapes, b, packed, packed_bias, attention_bias)
            key_length = b.op("Shape", [key], {"start": 1, "end": 2})
        else:
            rule = "mha-bnsh-kv"
            if key_4d is None:
                key_4d = b.op("Transpose", [site.key_t], {"perm": [0, 1, 3, 2]})
            key, value = key_4d, site.value
            key_length = b.op("Shape", [key], {"start": 2, "end": 3})
        query_length = b.op("Shape", [query], {"start": 1, "end": 2})
        attention_bias = self._attention_bias(site, layout, shapes, b, query_length, key_length)
        inputs = [query, key, value, packed_bias, None, attention_bias]
        while inputs and inputs[-1] is None:
            inputs.pop()
        attributes = {"num_heads": n, "scale": float(site.scale)}
        output = b.op("MultiHeadAttention", inputs, attributes, domain=MS_DOMAIN)
        _attach_output(site, output, layout, shapes, b, merged=True)
        self.rule_counts[rule] += 1
        self.tag(b.nodes, rule)
        return f"{MS_DOMAIN}.MultiHeadAttention"

    def _gqa_plan(self, site: Site, layout: Layout, shapes: Shapes):
        """(K, V with their own heads, KV heads) when the site may be GroupQueryAttention, else why not."""
        if self._padding_reason:
            return self._padding_reason
        reason = gqa.causal_padding_reason(
            site, layout.seq, layout.keys, self._mask_values, self.context.feeds, self._padding
        )
        if reason:
            return reason
        merged = _merged_heads(site.key_t, (0, 2, 3, 1), layout.keys, layout, shapes)
        if merged is not None:  # Kᵀ split straight from [B, L, hidden]: nothing repeats it
            return merged, site.value, layout.heads
        key_4d = _untransposed_key(site.key_t, layout, shapes)
        if key_4d is None:
            return "K is neither [B, L, hidden] split into heads nor a transposed [B, N, L, D] tensor"
        dims = (layout.batch, layout.heads, layout.keys, layout.head_dim)
        key, kv_heads = gqa.unrepeated(key_4d, *dims, shapes)
        value, value_heads = gqa.unrepeated(site.value, *dims, shapes)
        if kv_heads != value_heads:
            return f"K has {kv_heads} heads before repetition, V {value_heads}"
        return key, value, kv_heads

    def _emit_gqa(self, model, site, layout: Layout, shapes, b: _Builder, key, value, kv_heads: int) -> str:
        """Q [B, S, N·D], K/V [B, L, KV·D] without the repetition, causal mask and padding as
        per-row lengths: the op the CUDA EP runs with flash / memory-efficient kernels."""
        kv_layout = dataclasses.replace(layout, heads=kv_heads)
        query = _merged_heads(site.query, (0, 2, 1, 3), layout.seq, layout, shapes)
        if query is None:
            query = _bsh(site.query, layout.hidden, b)
        key = key if len(shapes(key) or ()) == 3 else _bsh(key, kv_layout.hidden, b)
        value = _merged_heads(value, (0, 2, 1, 3), layout.keys, kv_layout, shapes) or _bsh(
            value, kv_layout.hidden, b
        )
        seqlens, total = self._lengths(model, key, b)
        attributes = {"num_heads": layout.heads, "kv_num_heads": kv_heads, "scale": float(site.scale)}
        inputs = [query, key, value, None, None, seqlens, total]
        output = b.ops("GroupQueryAttention", inputs, attributes, domain=MS_DOMAIN, outputs=3)[0]
        _attach_output(site, output, layout, shapes, b, merged=True)
        self.rule_counts["gqa"] += 1
        self.tag(b.nodes, "gqa")
        return f"{MS_DOMAIN}.GroupQueryAttention"

    def _lengths(self, model, key: ir.Value, b: _Builder) -> tuple[ir.Value, ir.Value]:
        """(seqlens_k [B] = valid keys − 1, total_sequence_length) as int32, shared by the layers
        when they come from the attention-mask input."""
        int32 = ir.DataType.INT32
        if self._padding in self._lengths_cache:
            return self._lengths_cache[self._padding]
        one = b.const(np.array(1, np.int32))
        if self._padding is None:
            total = b.op(
                "Cast", [b.op("Squeeze", [b.op("Shape", [key], {"start": 1, "end": 2})])], {"to": int32}
            )
            batch = b.op("Shape", [key], {"start": 0, "end": 1})
            return b.op("Expand", [b.op("Sub", [total, one]), batch]), total
        mask = next(v for v in model.graph.inputs if v.name == self._padding)
        axis = b.const(np.array([1], np.int64))
        valid = b.op("ReduceSum", [b.op("Cast", [mask], {"to": int32}), axis], {"keepdims": 0})
        seqlens = b.op("Sub", [valid, one])
        length = b.op("Squeeze", [b.op("Shape", [mask], {"start": 1, "end": 2})])
        pair = (seqlens, b.op("Cast", [length], {"to": int32}))
        self._lengths_cache[self._padding] = pair
        return pair

    def _emit_packed(self, site, layout, shapes, b: _Builder, packed, packed_bias, attention_bias) -> str:
        """Q, K and V project one input: com.microsoft.Attention does the three GEMMs as one."""
        source, weights, split_bias = packed
        if split_bias is not None:
            bias = b.const(split_bias)
        elif packed_bias is not None:
            bias = packed_bias
        else:
            bias = b.const(np.zeros(weights.shape[1], np.float32))
        inputs = [source, b.const(weights), bias, None, None, attention_bias]
        while inputs[-1] is None:
            inputs.pop()
        attributes = {"num_heads": layout.heads, "scale": float(site.scale)}
        output = b.op("Attention", inputs, attributes, domain=MS_DOMAIN)
        _attach_output(site, output, layout, shapes, b, merged=True)
        self.rule_counts["attention-packed-qkv"] += 1
        self.tag(b.nodes, "attention-packed-qkv")
        return f"{MS_DOMAIN}.Attention"

    def _emit_packed_matmul(self, site, layout, shapes, b: _Builder, packed, packed_bias, attention_bias):
        """For int8: the Q/K/V GEMMs as one MatMul, which the quantize pass makes integer (inside
        com.microsoft.Attention they would stay fp32), split into MultiHeadAttention."""
        source, weights, split_bias = packed
        bias = b.const(split_bias) if split_bias is not None else packed_bias
        projected = b.op("MatMul", [source, b.const(weights)])
        parts = b.ops("Split", [projected], {"axis": -1, "num_outputs": 3}, outputs=3)
        inputs = [*parts, bias, None, attention_bias]
        while inputs[-1] is None:
            inputs.pop()
        attributes = {"num_heads": layout.heads, "scale": float(site.scale)}
        output = b.op("MultiHeadAttention", inputs, attributes, domain=MS_DOMAIN)
        _attach_output(site, output, layout, shapes, b, merged=True)
        self.rule_counts["mha-qkv-matmul"] += 1
        self.tag(b.nodes, "mha-qkv-matmul")
        return f"{MS_DOMAIN}.MultiHeadAttention"

    def _emit_onnx(self, model, site: Site, layout: Layout, shapes: Shapes, b: _Builder) -> str:
        if model.opset_imports.get("", 1) < ONNX_ATTENTION_OPSET:
            model.opset_imports[""] = ONNX_ATTENTION_OPSET
            model.graph.opset_imports[""] = ONNX_ATTENTION_OPSET
        key = b.op("Transpose", [site.key_t], {"perm": [0, 1, 3, 2]})
        query_length = b.op("Shape", [site.query], {"start": 2, "end": 3})
        key_length = b.op("Shape", [key], {"start": 2, "end": 3})
        mask = self._attention_bias(site, layout, shapes, b, query_length, key_length)
        inputs = [site.query, key, site.value] + ([mask] if mask is not None else [])
        output = b.op("Attention", inputs, {"scale": float(site.scale)})
        _attach_output(site, output, layout, shapes, b, merged=False)
        self.rule_counts["onnx-attention"] += 1
        self.tag(b.nodes, "onnx-attention")
        return "Attention"

    def _fold_projection_biases(self, inputs: list[ir.Value], hidden: int, b: _Builder, shapes: Shapes):
        """Q, K, V = projection + bias: feed the projections and one packed bias [3 × hidden]
        instead — the kernel adds it while it splits the heads, one pass fewer over each."""
        parts, folded = [], []
        for value in inputs:
            producer = value.producer()
            found = None
            if producer is not None and producer.op_type == "Add" and len(value.uses()) == 1:
                for i in (0, 1):
                    bias, other = producer.inputs[i], producer.inputs[1 - i]
                    tensor = ir.convenience.get_const_tensor(bias)
                    other_shape = shapes(other)
                    same_shape = other_shape is not None and other_shape == shapes(value)
                    if tensor is not None and tuple(tensor.shape.dims) == (hidden,) and same_shape:
                        found = (other, tensor.numpy().astype(np.float32))
                        break
            folded.append(found[0] if found else value)
            parts.append(found[1] if found else np.zeros(hidden, np.float32))
        if all(f is v for f, v in zip(folded, inputs, strict=True)):
            return inputs, None
        self.rule_counts["fold-projection-bias"] += 1
        return folded, b.const(np.concatenate(parts))

    def _bias_sum(self, terms: list[BiasTerm], b: _Builder) -> ir.Value | None:
        total = None
        for term in terms:
            if term.kind == "add":
                value = term.value
                if term.factor != 1.0:
                    value = b.op("Mul", [value, b.const(np.array(term.factor, np.float32))])
            else:
                fill = b.const(np.array(term.fill * term.factor, np.float32))
                zero = b.const(np.array(0.0, np.float32))
                pair = [zero, fill] if term.kind == "fill-false" else [fill, zero]
                value = b.op("Where", [term.value, *pair])
            total = value if total is None else b.op("Add", [total, value])
        return total

    def _attention_bias(self, site, layout, shapes, b: _Builder, query_length, key_length):
        """One additive bias of shape [B|1, N|1, S, L] (MHA broadcasts only the first two axes)."""
        if not site.biases:
            return None
        term_shapes = [shapes(t.value) for t in site.biases]
        full = (layout.seq, layout.keys)
        try:
            broadcast = np.broadcast_shapes(*term_shapes) if None not in term_shapes else None
        except ValueError:
            broadcast = None
        expand = broadcast is None or len(broadcast) != 4 or tuple(broadcast[2:]) != full
        key = (tuple(t.signature() for t in site.biases), expand, full)
        if key in self._bias_cache:
            return self._bias_cache[key]
        total = self._bias_sum(site.biases, b)
        if expand:
            ones = b.const(np.array([1, 1], np.int64))
            target = b.op("Concat", [ones, query_length, key_length], {"axis": 0})
            total = b.op("Expand", [total, target])
        self.rule_counts["attention-bias"] += 1
        self._bias_cache[key] = total
        return total


def _flattened_gemm(reshape: ir.Node, split: ir.Node, shapes: Shapes):
    """GPT-2's Conv1D: Reshape(Gemm(Reshape(X, [-1, in]), W, b), [B, S, 3·hidden]) → (X, W, b)."""
    gemm = reshape.inputs[0].producer()
    if gemm is None or gemm.op_type != "Gemm" or not _private(reshape.inputs[0]):
        return None
    plain = {"alpha": 1.0, "beta": 1.0, "transA": 0, "transB": 0}
    if any(gemm.attributes.get(k) is not None and gemm.attributes[k].value != v for k, v in plain.items()):
        return None
    weights = ir.convenience.get_const_tensor(gemm.inputs[1])
    has_bias = len(gemm.inputs) > 2 and gemm.inputs[2] is not None
    bias = ir.convenience.get_const_tensor(gemm.inputs[2]) if has_bias else None
    flatten = gemm.inputs[0].producer()
    if weights is None or (has_bias and bias is None) or flatten is None or flatten.op_type != "Reshape":
        return None
    bias_array = bias.numpy() if bias is not None else np.zeros(weights.shape[1], np.float32)
    source, packed = flatten.inputs[0], split.inputs[0]
    source_shape, packed_shape = shapes(source), shapes(packed)
    rows, columns = weights.shape[0], weights.shape[1]
    if source_shape is None or packed_shape is None or len(source_shape) != 3 or columns % 3:
        return None
    if (
        source_shape[2] != rows
        or packed_shape != (*source_shape[:2], columns)
        or bias_array.shape != (columns,)
    ):
        return None
    return source, weights.numpy().astype(np.float32), bias_array.astype(np.float32)


def _untransposed_key(key_t: ir.Value, layout: Layout, shapes: Shapes) -> ir.Value | None:
    """K [B, N, L, D] behind Kᵀ: Transpose(0, 1, 3, 2), or torch's sdpa decomposition
    Reshape(Transpose(0, 2, 1)(Reshape(K, [B·N, L, D])), [B, N, D, L])."""
    producer = key_t.producer()
    if _perm(producer) == (0, 1, 3, 2):
        return producer.inputs[0]
    if producer is None or producer.op_type != "Reshape":
        return None
    transpose = producer.inputs[0].producer()
    if _perm(transpose) != (0, 2, 1):
        return None
    flatten = transpose.inputs[0].producer()
    if flatten is None or flatten.op_type != "Reshape":
        return None
    key = flatten.inputs[0]
    b, n, length, d = layout.batch, layout.heads, layout.keys, layout.head_dim
    if shapes(key) != (b, n, length, d) or shapes(flatten.outputs[0]) != (b * n, length, d):
        return None
    return key


def _packed_projection(
    site: Site, query: ir.Value, key: ir.Value, value: ir.Value, shapes: Shapes
) -> tuple[ir.Value, np.ndarray] | None:
    """(X, [Wq | Wk | Wv], bias or None) when Q, K, V are MatMul(X, W) with constant W read only
    by this site, or the three outputs of one Split of MatMul(X, W) (+ b) (ViT, GPT-2 packed QKV)."""
    targets = {id(site.qk), id(site.pv)}
    split = _split_projection(query, key, value, targets, shapes)
    if split is not None:
        return split
    weights, source = [], None
    for projected in (query, key, value):
        producer = projected.producer()
        if producer is None or producer.op_type != "MatMul" or projected.is_graph_output():
            return None
        if not all(_only_feeds(user, targets) for user, _ in projected.uses()):
            return None
        tensor = ir.convenience.get_const_tensor(producer.inputs[1])
        if tensor is None or len(tensor.shape) != 2:
            return None
        if source is not None and producer.inputs[0] is not source:
            return None
        source = producer.inputs[0]
        weights.append(tensor.numpy().astype(np.float32))
    return source, np.concatenate(weights, axis=1), None


def _split_projection(
    query, key, value, targets, shapes: Shapes
) -> tuple[ir.Value, np.ndarray, np.ndarray | None] | None:
    split = query.producer()
    if split is None or split.op_type != "Split" or list(split.outputs) != [query, key, value]:
        return None
    packed = split.inputs[0]
    rank = packed.shape.rank() if packed.shape is not None else 3
    if split.attributes.get_int("axis", 0) not in (-1, rank - 1) or not _private(packed):
        return None
    if not all(_only_feeds(user, targets) for output in split.outputs for user, _ in output.uses()):
        return None
    bias = None
    producer = packed.producer()
    if producer is not None and producer.op_type == "Add":
        for i in (0, 1):
            tensor = ir.convenience.get_const_tensor(producer.inputs[i])
            if tensor is not None and len(tensor.shape) == 1:
                bias, packed = tensor.numpy().astype(np.float32), producer.inputs[1 - i]
                break
        if bias is None or not _private(packed):
            return None
        producer = packed.producer()
    if producer is not None and producer.op_type == "Reshape" and bias is None:
        return _flattened_gemm(producer, split, shapes)
    if producer is None or producer.op_type != "MatMul":
        return None
    weights = ir.convenience.get_const_tensor(producer.inputs[1])
    if weights is None or len(weights.shape) != 2 or weights.shape[1] % 3:
        return None
    sizes_tensor = (
        ir.convenience.get_const_tensor(split.inputs[1])
        if len(split.inputs) > 1 and split.inputs[1]
        else None
    )
    sizes = sizes_tensor.numpy().tolist() if sizes_tensor is not None else None
    if sizes is not None and len(set(sizes)) != 1:
        return None
    return producer.inputs[0], weights.numpy().astype(np.float32), bias


def _private(value: ir.Value) -> bool:
    """Read by one node and not a graph output: fusing its reader frees it."""
    return len(value.uses()) == 1 and not value.is_graph_output()


def _only_feeds(node: ir.Node, targets: set[int], budget: int = 64) -> bool:
    """Whether everything ``node`` computes ends in ``targets`` (so fusing the site frees it).

    A bounded walk over the nodes downstream of ``node``, stopping at the targets: shape
    arithmetic that only feeds the site's own reshapes counts as freed too.
    """
    seen, frontier = {id(node)}, [node]
    while frontier:
        current = frontier.pop()
        if id(current) in targets:
            continue
        if any(output.is_graph_output() for output in current.outputs):
            return False
        users = [user for output in current.outputs for user, _ in output.uses()]
        if not users:
            return False
        for user in users:
            if id(user) not in seen:
                seen.add(id(user))
                frontier.append(user)
        if len(seen) > budget:
            return False
    return True


def _attach_output(site: Site, output: ir.Value, layout: Layout, shapes: Shapes, b: _Builder, merged: bool):
    """Replace the merged-heads [B, S, hidden] tensor after P·V, or P·V itself when there is none.

    ``Shape`` readers of the split tensors (TorchScript computes the merge's target shape from
    them) are rebuilt from the fused output, so they do not keep the unfused chain alive.
    """
    product = site.pv.outputs[0]
    target = None
    if merged and not product.is_graph_output():
        users = _non_shape_users(product)
        if len(users) == 1 and _perm(users[0]) == (0, 2, 1, 3):
            transposed = users[0].outputs[0]
            after = _non_shape_users(transposed)
            if len(after) == 1 and after[0].op_type == "Reshape" and not transposed.is_graph_output():
                candidate = after[0].outputs[0]
                if shapes(candidate) == (layout.batch, layout.seq, layout.hidden):
                    target = candidate
                    heads = b.const(np.array([layout.heads], np.int64))
                    size = b.const(np.array([layout.head_dim], np.int64))
                    batch = b.op("Shape", [output], {"start": 0, "end": 1})
                    seq = b.op("Shape", [output], {"start": 1, "end": 2})
                    _replace_shapes(product, b, [batch, heads, seq, size])
                    _replace_shapes(transposed, b, [batch, seq, heads, size])
    if target is None:
        target = product
        if merged:
            shape = b.const(np.array([0, 0, layout.heads, layout.head_dim], np.int64))
            split = b.op("Reshape", [output, shape])
            output = b.op("Transpose", [split], {"perm": [0, 2, 1, 3]})
    target.replace_all_uses_with(output, replace_graph_outputs=True)


def _non_shape_users(value: ir.Value) -> list[ir.Node]:
    return [user for user, _ in value.uses() if not _whole_shape(user)]


def _whole_shape(node: ir.Node) -> bool:
    return node.op_type == "Shape" and "start" not in node.attributes and "end" not in node.attributes


def _replace_shapes(value: ir.Value, b: _Builder, parts: list[ir.Value]) -> None:
    readers = [user for user, _ in value.uses() if _whole_shape(user)]
    if readers:
        rebuilt = b.op("Concat", parts, {"axis": 0})
        for reader in readers:
            reader.outputs[0].replace_all_uses_with(rebuilt, replace_graph_outputs=True)


def _layout(site: Site, shapes: Shapes) -> Layout | None:
    query, key_t, value = shapes(site.query), shapes(site.key_t), shapes(site.value)
    if query is None or key_t is None or value is None:
        site.fail("shapes of Q, K, V unknown (no static shapes and no verification inputs)")
        return None
    if not len(query) == len(key_t) == len(value) == 4:
        site.fail(f"Q, Kᵀ, V are not 4-D head-split tensors ({len(query)}, {len(key_t)}, {len(value)})")
        return None
    batch, heads, seq, head_dim = query
    if key_t[1] != heads or value[1] != heads:
        site.fail(f"K/V have {key_t[1]}/{value[1]} heads, Q has {heads} (grouped KV not repeated)")
        return None
    if key_t[2] != head_dim or value[3] != head_dim:
        site.fail(f"head sizes differ: Q {head_dim}, K {key_t[2]}, V {value[3]}")
        return None
    if key_t[3] != value[2]:
        site.fail(f"K has {key_t[3]} positions, V has {value[2]}")
        return None
    if key_t[0] != batch or value[0] != batch:
        site.fail("Q, K and V disagree on the batch size")
        return None
    return Layout(batch, heads, seq, key_t[3], head_dim)


def _record(site: Site, op: str | None, note: str | None = None) -> dict[str, Any]:
    record: dict[str, Any] = {"site": site.name}
    if op is None:
        record.update(status="unfused", reason=site.reason or "not fused")
    else:
        masks = sorted({t.kind for t in site.biases})
        record.update(status="fused", op=op, scale=round(site.scale, 6), bias=masks or None)
        if note:
            record["note"] = note
    return record


def _bsh(value: ir.Value, hidden: int, b: _Builder) -> ir.Value:
    """[B, N, S, D] → [B, S, N·D]."""
    transposed = b.op("Transpose", [value], {"perm": [0, 2, 1, 3]})
    return b.op("Reshape", [transposed, b.const(np.array([0, 0, hidden], np.int64))])
