"""Quantize: int8 MatMul/Gemm products for the CPU, or int4 weight-only (MatMulNBits).

On a few CPU cores the matrix products dominate a transformer, and ORT's integer kernels run
them two to three times as fast in int8. The int8 form is txcompile's own (int8_matmul.py):
activations scaled per token where the simulated rounding says it pays (per tensor, as
``onnxruntime.quantization.quantize_dynamic`` does, elsewhere), after moving channel outliers
into the weights where that pays. The pass measures the error against the
fp32 graph on the verification inputs and, when ``--min-cosine`` asks for it, leaves the most
sensitive products in fp32. Sensitivity is measured, not guessed: each product is recomputed
from its recorded input activation with the int8 rounding, and the worst ones stay fp32 first.
Each product is then rewritten by one rule, ``int8-matmul`` (int8_rule.py), which records
every MatMul/Gemm it looked at in ``details["sites"]``. int4 is onnxruntime's
MatMulNBitsQuantizer (a whole-model tool, no per-site records).

Approximate: reports the cosine and the largest difference against fp32.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from typing import Any

import numpy as np
import onnx
import onnx_ir as ir

from txcompile.graph import ort as rt
from txcompile.graph import workspace
from txcompile.graph.errors import TxError
from txcompile.graph.nodes import MS_DOMAIN
from txcompile.graph.probe import probe_values
from txcompile.passes.base import TxPass
from txcompile.passes.rules import SiteRecord, apply_rule
from txcompile.passes.sparsity.calibration import calibration_feeds
from txcompile.passes.sparsity.linears import Linear, find_linears
from txcompile.passes.targets import int8_matmul
from txcompile.passes.targets.int8_rule import Int8MatMulRule, Int8State, Tally, linear_key
from txcompile.passes.targets.precision import requested_precision

INT4_BLOCK = 32
MIN_OPSET = 15  # Shape with start/end


@dataclasses.dataclass(frozen=True)
class QuantizeOptions:
    precision: str | None = None
    min_cosine: float | None = None  # keep the linears fp32 whose output cosine would fall below
    int8_activations: str = "auto"
    calib: str | None = None  # an .npz of calibration inputs

    def __post_init__(self) -> None:
        if self.min_cosine is not None and not 0.0 < self.min_cosine <= 1.0:
            raise TxError(f"--min-cosine {self.min_cosine}: must be in (0, 1]")
        if self.int8_activations not in int8_matmul.ACTIVATION_MODES:
            modes = ", ".join(int8_matmul.ACTIVATION_MODES)
            raise TxError(f"--int8-activations {self.int8_activations}: choose one of {modes}")


class Quantize(TxPass):
    name = "quantize"
    summary = (
        "int8 MatMul/Gemm, per-token scales where they pay (or int4 weight-only); "
        "sensitive ones fp32 on request"
    )
    exact = False
    Options = QuantizeOptions

    def __init__(self, context=None) -> None:
        super().__init__(context)
        self.precision = requested_precision(self.options.precision, self.context.target)
        self.min_cosine = self.options.min_cosine
        self.activations = self.options.int8_activations

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        if self.precision not in ("int8", "int4"):
            self.details = {"precision": self.precision, "note": "nothing to do at this precision"}
            return ir.passes.PassResult(model, False)
        opset = _default_opset(model)
        if self.precision == "int8" and opset < MIN_OPSET:
            self.details = {"precision": self.precision, "note": f"opset {opset} < {MIN_OPSET}: left fp32"}
            return ir.passes.PassResult(model, False)
        # onnxruntime's quantizers read a proto with its weights in it
        original = workspace.standalone_proto(model)
        candidates = quantizable_matmuls(original)
        if not candidates:
            self.details = {"precision": self.precision, "note": "no MatMul/Gemm with a constant weight"}
            return ir.passes.PassResult(model, False)
        feeds = self.context.feeds
        reference = rt.run(rt.create_session(original), feeds) if feeds else None
        if self.precision == "int8":
            calib = self.options.calib
            calib_feeds = calibration_feeds(original, calib, feeds)[0] if calib else feeds
            plan = Int8Plan(original, candidates, calib_feeds, mode=self.activations)
            build = plan.build
        else:
            plan = None

            def build(exclude):
                weights = gemms_as_matmuls(own_weights(_copy(original)))
                return quantize_int4(weights, exclude, self.context.device)

        excluded: list[str] = []
        ranking: list[tuple[str, float]] = []
        quantized, score = self._try(build, excluded, reference)
        if self.min_cosine is not None and reference is not None and score["cosine"] < self.min_cosine:
            ranking = plan.sensitivity() if plan else int4_sensitivity(original, candidates, feeds)
            excluded, quantized, score = self._fewest_fp32(build, ranking, reference)
        done = len(candidates) - len(excluded)
        if plan is None:  # int4: what the quantizer converted, not what it was offered
            done = sum(n.op_type == "MatMulNBits" for n in quantized.graph.node)
        if done:
            self.rule_counts[f"{self.precision}-matmul"] = done
        if excluded:
            self.rule_counts["kept-fp32"] = len(excluded)
        self.details = {
            "precision": self.precision,
            "quantized": done,
            "kept_fp32": excluded,
            "min_cosine": self.min_cosine,
            **score,
            "most_sensitive": [{"node": n, "relative_error": e} for n, e in ranking[:10]],
            **(plan.describe() if plan else {}),
        }
        if plan is not None:
            self.details["sites"] = [r.as_dict() for r in plan.records.get(frozenset(excluded), [])]
        if self.min_cosine is not None and score.get("cosine", 1.0) < self.min_cosine:
            self.details["note"] = "cosine stays below --min-cosine even with every MatMul in fp32"
        _replace_graph(model, quantized)
        if plan is not None and len(candidates) > len(excluded):
            model.metadata_props[int8_matmul.WEIGHT_BITS_KEY] = str(plan.bits)  # read by run / bench
        return ir.passes.PassResult(model, True)

    def _fewest_fp32(self, build, ranking: list[tuple[str, float]], reference):
        """Keep the k most sensitive MatMuls fp32, for the smallest k that reaches --min-cosine:
        k doubles until it does, then a bisection between the last two tries."""
        tried: dict[int, tuple[onnx.ModelProto, dict]] = {}

        def meets(count: int) -> bool:
            if count not in tried:
                tried[count] = self._try(build, [n for n, _ in ranking[:count]], reference)
            return tried[count][1]["cosine"] >= self.min_cosine

        low, high = 0, 1  # low fails (k = 0 was the first try)
        while high < len(ranking) and not meets(high):
            low, high = high, min(2 * high, len(ranking))
        if meets(high):
            while high - low > 1:
                middle = (low + high) // 2
                low, high = (low, middle) if meets(middle) else (middle, high)
        quantized, score = tried[high]
        return [n for n, _ in ranking[:high]], quantized, score

    def _try(self, build, exclude: list[str], reference) -> tuple[onnx.ModelProto, dict]:
        with _quiet_logging():
            quantized = build(exclude)
        score = {}
        if reference is not None:
            outputs = rt.run(rt.create_session(quantized, self.context.device), self.context.feeds)
            score = {
                "cosine": cosine(reference, outputs, padding_mask(self.context.feeds)),
                "max_abs_error": rt.max_abs_diff(reference, outputs),
            }
        return quantized, score


class Int8Plan:
    """What the int8 rewrite of one graph needs, worked out once for every try of --min-cosine:
    the products grouped by the activation they read, each group's recorded activation rows
    and its scheme (per token or per tensor, smoothed or not)."""

    def __init__(
        self,
        original: onnx.ModelProto,
        candidates: list[str],
        feeds,
        bits: int | None = None,
        mode: str = "auto",
    ) -> None:
        """``feeds``: the calibration inputs (--calib, else the verification inputs; none:
        per token, no smoothing, and no ranking for --min-cosine); ``bits``: of the weights, by default what
        this CPU's int8 kernel takes without saturating; ``mode``: --int8-activations."""
        self.original, self.candidates = original, set(candidates)
        self.bits = bits or int8_matmul.weight_bits()
        self.mode = mode
        self.records: dict[frozenset[str], list[SiteRecord]] = {}  # per build: what each site became
        model = ir.serde.deserialize_model(original)
        self.groups: dict[str, list[tuple[str, np.ndarray]]] = {}
        inputs = []
        for linear in _linears(model.graph, self.candidates):
            inputs.append(linear.node.inputs[0])
            self.groups.setdefault(inputs[-1].name, []).append((linear_key(linear), linear.matrix()))
        recorded = probe_values(model, inputs, feeds) if feeds else {}
        self.rows = {name: int8_matmul.calibration_rows(v) for name, v in recorded.items()}
        self.schemes = {
            name: int8_matmul.choose_scheme(self.rows.get(name), [w for _, w in members], self.bits, mode)
            for name, members in self.groups.items()
        }

    def build(self, exclude: list[str]) -> onnx.ModelProto:
        """The int8 graph with ``exclude`` kept fp32; its site records go to ``self.records``."""
        model = ir.serde.deserialize_model(self.original)
        state = Int8State(self.schemes, self.bits, _default_opset(model), self.candidates, set(exclude))
        records = apply_rule(Tally(), Int8MatMulRule(), model, state)
        self.records[frozenset(exclude)] = records
        if any(not self.schemes[name].per_token for name in state.inputs):
            model.opset_imports.setdefault(MS_DOMAIN, 1)  # DynamicQuantizeMatMul
        return ir.serde.serialize_model(model)

    def sensitivity(self) -> list[tuple[str, float]]:
        """Products by the relative error of their simulated int8 rounding, worst first."""
        scores = []
        for name, members in self.groups.items():
            for (key, _), error in zip(members, self.schemes[name].errors, strict=True):
                scores.append((key, 0.0 if np.isnan(error) else error))
        return sorted(scores, key=lambda item: -item[1])

    def describe(self) -> dict[str, Any]:
        schemes = list(self.schemes.values())
        return {
            "activations": self.mode,
            "activation_scales": f"per token: int8 ±{int8_matmul.ACTIVATION_LEVELS} as uint8 around 128; "
            "per tensor: uint8 (DynamicQuantizeMatMul)"
            + (
                f"; auto: per token where that cuts the simulated error by {int8_matmul.TOKEN_GAIN:.0%}"
                if self.mode == "auto"
                else ""
            ),
            "weight_bits": self.bits,
            "weights": f"int8 per output column (±{2 ** (self.bits - 1) - 1})"
            + ("" if self.bits == 8 else ": this CPU's int8 kernel would saturate 8-bit weights (no VNNI)"),
            "inputs": len(schemes),
            "per_token_inputs": sum(s.per_token for s in schemes),
            "smoothed_inputs": sum(s.divisor is not None for s in schemes),
            "smoothing_alpha": int8_matmul.ALPHA,
        }


def _linears(graph: ir.Graph, names: set[str]) -> list[Linear]:
    return [linear for linear in find_linears(graph) if linear_key(linear) in names]


def _default_opset(model: ir.Model) -> int:
    return model.opset_imports.get("", model.opset_imports.get("ai.onnx", 0))


def _copy(proto: onnx.ModelProto) -> onnx.ModelProto:
    copy = onnx.ModelProto()
    copy.CopyFrom(proto)
    return copy


def quantize_int4(proto: onnx.ModelProto, exclude: list[str], device: str) -> onnx.ModelProto:
    """Weight-only 4-bit blocks (MatMulNBits); on the CPU the products run with int8 inputs."""
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    quantizer = MatMulNBitsQuantizer(
        proto,
        bits=4,
        block_size=INT4_BLOCK,
        is_symmetric=True,
        accuracy_level=4 if device == "cpu" else None,
        nodes_to_exclude=list(exclude),
    )
    quantizer.process()
    return quantizer.model.model


def gemms_as_matmuls(proto: onnx.ModelProto) -> onnx.ModelProto:
    """Gemm(A, W, c) with a constant W (alpha = beta = 1, A not transposed) as MatMul(A, W)
    + c, and MatMul(A, Transpose(W)) as MatMul(A, Wᵀ), in place: the int4 quantizer takes
    MatMuls of constant weights only (GPT-2's Conv1D exports as Gemm; its tied LM head reads
    the embedding table through a Transpose). The MatMul keeps the Gemm's name, so exclusions
    by name still apply."""
    weights = {t.name: t for t in proto.graph.initializer}
    transposed = {
        node.output[0]: node.input[0]
        for node in proto.graph.node
        if node.op_type == "Transpose"
        and node.input[0] in weights
        and len(weights[node.input[0]].dims) == 2
        and [a.ints for a in node.attribute if a.name == "perm"] in ([], [[1, 0]])
    }
    nodes = []
    for node in proto.graph.node:
        if node.op_type == "MatMul" and node.domain in ("", "ai.onnx") and node.input[1] in transposed:
            source = transposed[node.input[1]]
            array = onnx.numpy_helper.to_array(weights[source]).T
            copy = f"{source}_transposed_{len(proto.graph.initializer)}"
            proto.graph.initializer.append(onnx.numpy_helper.from_array(np.ascontiguousarray(array), copy))
            node.input[1] = copy
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        plain = (
            attrs.get("alpha", 1.0) == 1.0 and attrs.get("beta", 1.0) == 1.0 and not attrs.get("transA", 0)
        )
        if (
            node.op_type != "Gemm"
            or node.domain not in ("", "ai.onnx")
            or not plain
            or node.input[1] not in weights
        ):
            nodes.append(node)
            continue
        weight = node.input[1]
        if attrs.get("transB", 0):
            array = onnx.numpy_helper.to_array(weights[weight]).T
            weight = f"{weight}_transposed"
            proto.graph.initializer.append(onnx.numpy_helper.from_array(np.ascontiguousarray(array), weight))
        bias = node.input[2] if len(node.input) > 2 and node.input[2] else None
        product = f"{node.output[0]}_product" if bias else node.output[0]
        nodes.append(onnx.helper.make_node("MatMul", [node.input[0], weight], [product], name=node.name))
        if bias:
            nodes.append(
                onnx.helper.make_node("Add", [product, bias], [node.output[0]], name=f"{node.name}_bias")
            )
    del proto.graph.node[:]
    proto.graph.node.extend(nodes)
    return proto


def quantizable_matmuls(proto: onnx.ModelProto) -> list[str]:
    """MatMul/Gemm nodes (by name, else by output) whose weight is a constant 2-D float32 matrix."""
    graph = ir.serde.deserialize_model(proto).graph
    return [linear_key(linear) for linear in find_linears(graph) if linear.matrix().dtype == np.float32]


def own_weights(proto: onnx.ModelProto) -> onnx.ModelProto:
    """Give a MatMul its own copy of a weight that other ops also read (tied embeddings).

    The int4 quantizer would otherwise hand those readers a dequantized copy: a silent
    precision loss outside the MatMuls we were asked to quantize.
    """
    matmuls = set(quantizable_matmuls(proto))
    readers: dict[str, list[onnx.NodeProto]] = {}
    for node in proto.graph.node:
        for name in set(node.input):
            readers.setdefault(name, []).append(node)
    weights = {t.name: t for t in proto.graph.initializer}
    shared = {
        name
        for name, nodes in readers.items()
        if name in weights
        and any(n.name in matmuls for n in nodes)
        and any(n.name not in matmuls for n in nodes)
    }
    shared |= {o.name for o in proto.graph.output if o.name in weights}
    for node in proto.graph.node:
        if node.name in matmuls and node.input[1] in shared:
            copy = onnx.TensorProto()
            copy.CopyFrom(weights[node.input[1]])
            copy.name = f"{node.input[1]}_{node.name}"
            proto.graph.initializer.append(copy)
            node.input[1] = copy.name
    return proto


def int4_sensitivity(original: onnx.ModelProto, candidates: list[str], feeds) -> list[tuple[str, float]]:
    """Products by the relative error of 4-bit block-rounded weights on their recorded inputs."""
    model = ir.serde.deserialize_model(original)
    linears = _linears(model.graph, set(candidates))
    recorded = probe_values(model, [linear.node.inputs[0] for linear in linears], feeds)
    scores = []
    for linear in linears:
        x = int8_matmul.calibration_rows(recorded[linear.node.inputs[0].name]).astype(np.float64)
        w = linear.matrix().astype(np.float64)
        exact = x @ w
        error = np.linalg.norm(x @ _fake_int4(w) - exact) / max(np.linalg.norm(exact), 1e-30)
        scores.append((linear_key(linear), float(error)))
    return sorted(scores, key=lambda item: -item[1])


def _fake_int4(w: np.ndarray) -> np.ndarray:
    """Symmetric 4-bit blocks of INT4_BLOCK rows per column, as MatMulNBits stores them."""
    k = w.shape[0]
    padded = np.pad(w, ((0, -k % INT4_BLOCK), (0, 0))).reshape(-1, INT4_BLOCK, w.shape[1])
    peak = np.abs(padded).max(axis=1, keepdims=True)
    scale = np.where(peak > 0, peak / 7, 1.0)
    return (np.clip(np.rint(padded / scale), -8, 7) * scale).reshape(-1, w.shape[1])[:k]


def cosine(
    reference: dict[str, np.ndarray], outputs: dict[str, np.ndarray], mask: np.ndarray | None = None
) -> float:
    """The smallest cosine similarity, per sample (axis 0), over the float outputs.

    With a padding ``mask`` [batch, seq], positions it marks 0 are left out of outputs shaped
    [batch, seq, ...]: what a padded token computes is never read.
    """
    worst = 1.0
    for a, b in zip(reference.values(), outputs.values(), strict=True):
        if not np.issubdtype(a.dtype, np.floating) or a.size == 0:
            continue
        a, b = a.astype(np.float64), b.astype(np.float64)
        if mask is not None and a.ndim >= 2 and a.shape[:2] == mask.shape:
            keep = mask.astype(bool).reshape(mask.shape + (1,) * (a.ndim - 2))
            a, b = a * keep, b * keep
        a2 = a.reshape(a.shape[0], -1) if a.ndim else a.reshape(1, 1)
        b2 = b.reshape(a2.shape)
        norms = np.linalg.norm(a2, axis=1) * np.linalg.norm(b2, axis=1)
        worst = min(worst, float(np.min(np.sum(a2 * b2, axis=1) / np.maximum(norms, 1e-30))))
    return worst


def padding_mask(feeds: dict[str, np.ndarray]) -> np.ndarray | None:
    """The attention/padding mask among the inputs: a 2-D integer or bool input named *mask*."""
    for name, value in feeds.items():
        integer = value.dtype == bool or np.issubdtype(value.dtype, np.integer)
        if "mask" in name.lower() and value.ndim == 2 and integer:
            return value
    return None


def _replace_graph(model: ir.Model, proto: onnx.ModelProto) -> None:
    """Put the quantized graph into the model object the pass manager handed us."""
    quantized = ir.serde.deserialize_model(proto)
    model.graph = quantized.graph
    model.functions.clear()
    model.functions.update(quantized.functions)


@contextlib.contextmanager
def _quiet_logging():
    """onnxruntime.quantization logs advice and per-node INFO lines on the root logger."""
    loggers = [logging.getLogger(), logging.getLogger("onnxruntime.quantization.matmul_nbits_quantizer")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)
