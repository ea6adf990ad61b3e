"""Quantize: int8 MatMul/Gemm weights for the CPU (dynamic), or int4 weight-only (MatMulNBits).

On a few CPU cores the matrix products dominate a transformer, and ORT's integer kernels run
them about twice as fast in int8. onnxruntime.quantization does the rewriting; this pass adds
what a compiler owes: it measures the error against the fp32 graph on the verification
inputs and, when ``--min-cosine`` asks for it, leaves the most sensitive MatMuls in fp32.
Sensitivity is measured, not guessed: each MatMul's product is recomputed from its recorded
input activation with int8-rounded operands, and the worst ones are kept fp32 first.

Approximate: reports the cosine and the largest difference against fp32.
"""

from __future__ import annotations

import contextlib
import logging
import tempfile
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir

from txcompile.errors import TxError
from txcompile.passes.base import TxPass
from txcompile.passes.precision import requested_precision
from txcompile.runtime import session as rt

# Not com.microsoft.Attention: its QAttention form took all-MiniLM-L6-v2's worst sentence
# embedding to cosine 0.45 against fp32 (0.98 with the same projections as int8 MatMuls).
QUANTIZED_OPS = ["MatMul", "Gemm"]
# One scale per output column, which onnxruntime stores as 7-bit weights (no u8s8 saturation
# on CPUs without VNNI): MiniLM's worst-sentence cosine goes from 0.86 to 0.98.
PER_CHANNEL = True
INT4_BLOCK = 32


class Quantize(TxPass):
    name = "quantize"
    summary = "dynamic int8 MatMul/Gemm weights (or int4 weight-only); sensitive layers fp32 on request"
    exact = False

    def __init__(self, context=None) -> None:
        super().__init__(context)
        self.precision = requested_precision(self.context)
        self.min_cosine = self.context.options.get("min_cosine")
        if self.min_cosine is not None and not 0.0 < self.min_cosine <= 1.0:
            raise TxError(f"--min-cosine {self.min_cosine}: must be in (0, 1]")

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        if self.precision not in ("int8", "int4"):
            self.details = {"precision": self.precision, "note": "nothing to do at this precision"}
            return ir.passes.PassResult(model, False)
        original = own_weights(ir.serde.serialize_model(model))
        candidates = quantizable_matmuls(original)
        if not candidates:
            self.details = {"precision": self.precision, "note": "no MatMul/Gemm with a constant weight"}
            return ir.passes.PassResult(model, False)
        feeds = self.context.feeds
        reference = rt.run(rt.create_session(original), feeds) if feeds else None
        excluded: list[str] = []
        ranking: list[tuple[str, float]] = []
        quantized, score = self._quantize(original, excluded, reference)
        if self.min_cosine is not None and reference is not None and score["cosine"] < self.min_cosine:
            ranking = sensitivity(original, candidates, feeds)
            excluded, quantized, score = self._fewest_fp32(original, ranking, reference)
        if len(candidates) > len(excluded):
            self.rule_counts[f"{self.precision}-matmul"] = len(candidates) - len(excluded)
        if excluded:
            self.rule_counts["kept-fp32"] = len(excluded)
        self.details = {
            "precision": self.precision,
            "quantized": len(candidates) - len(excluded),
            "kept_fp32": excluded,
            "min_cosine": self.min_cosine,
            **score,
            "most_sensitive": [{"node": n, "relative_error": e} for n, e in ranking[:10]],
        }
        if self.min_cosine is not None and score.get("cosine", 1.0) < self.min_cosine:
            self.details["note"] = "cosine stays below --min-cosine even with every MatMul in fp32"
        _replace_graph(model, quantized)
        return ir.passes.PassResult(model, True)

    def _fewest_fp32(self, original: onnx.ModelProto, ranking: list[tuple[str, float]], reference):
        """Keep the k most sensitive MatMuls fp32, for the smallest k that reaches --min-cosine:
        k doubles until it does, then a bisection between the last two tries."""
        tried: dict[int, tuple[onnx.ModelProto, dict]] = {}

        def meets(count: int) -> bool:
            if count not in tried:
                tried[count] = self._quantize(original, [n for n, _ in ranking[:count]], reference)
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

    def _quantize(
        self, proto: onnx.ModelProto, exclude: list[str], reference
    ) -> tuple[onnx.ModelProto, dict]:
        with _quiet_logging():
            if self.precision == "int8":
                quantized = quantize_int8(proto, exclude)
            else:
                quantized = quantize_int4(proto, exclude, self.context.device)
        score = {}
        if reference is not None:
            outputs = rt.run(rt.create_session(quantized, self.context.device), self.context.feeds)
            score = {
                "cosine": cosine(reference, outputs, padding_mask(self.context.feeds)),
                "max_abs_error": rt.max_abs_diff(reference, outputs),
            }
        return quantized, score


def quantize_int8(proto: onnx.ModelProto, exclude: list[str]) -> onnx.ModelProto:
    """onnxruntime's dynamic quantization: int8 weights, uint8 activations scaled per call."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    with tempfile.TemporaryDirectory(prefix="txcompile-int8-") as folder:
        output = Path(folder) / "int8.onnx"
        quantize_dynamic(
            proto,
            output,
            op_types_to_quantize=QUANTIZED_OPS,
            weight_type=QuantType.QInt8,
            per_channel=PER_CHANNEL,
            nodes_to_exclude=list(exclude),
            # com.microsoft outputs (EmbedLayerNormalization, ...) get no type from ONNX shape
            # inference; the graphs this pass sees compute in float32
            extra_options={"MatMulConstBOnly": True, "DefaultTensorType": onnx.TensorProto.FLOAT},
        )
        return onnx.load(output)


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


def quantizable_matmuls(proto: onnx.ModelProto) -> list[str]:
    """Names of MatMul/Gemm nodes whose weight is a 2-D float initializer."""
    weights = {
        t.name for t in proto.graph.initializer if len(t.dims) == 2 and t.data_type == onnx.TensorProto.FLOAT
    }
    return [
        n.name
        for n in proto.graph.node
        if n.op_type in QUANTIZED_OPS and n.domain == "" and len(n.input) > 1 and n.input[1] in weights
    ]


def own_weights(proto: onnx.ModelProto) -> onnx.ModelProto:
    """Give a MatMul its own copy of a weight that other ops also read (tied embeddings).

    The quantizer would otherwise hand those readers a dequantized int8 copy: a silent
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


def sensitivity(proto: onnx.ModelProto, names: list[str], feeds) -> list[tuple[str, float]]:
    """MatMuls by the relative error of their product with int8-rounded operands, worst first."""
    nodes = {n.name: n for n in proto.graph.node if n.name in set(names)}
    weights = {t.name: onnx.numpy_helper.to_array(t) for t in proto.graph.initializer}
    probe = onnx.ModelProto()
    probe.CopyFrom(proto)
    existing = {o.name for o in probe.graph.output}
    activations = sorted({n.input[0] for n in nodes.values()} - existing)
    probe.graph.output.extend(onnx.helper.make_empty_tensor_value_info(name) for name in activations)
    session = rt.create_session(probe, optimize=False)
    values = dict(
        zip([o.name for o in session.get_outputs()], session.run(None, _taken(session, feeds)), strict=True)
    )
    scores = []
    for name, node in nodes.items():
        x = values[node.input[0]].reshape(-1, values[node.input[0]].shape[-1]).astype(np.float64)
        w = weights[node.input[1]].astype(np.float64)
        if node.op_type == "Gemm" and any(a.name == "transB" and a.i for a in node.attribute):
            w = w.T
        exact = x @ w
        approx = _fake_uint8(x) @ _fake_int8(w)
        scores.append((name, float(np.linalg.norm(exact - approx) / max(np.linalg.norm(exact), 1e-12))))
    return sorted(scores, key=lambda item: -item[1])


def _taken(session, feeds):
    wanted = {i.name for i in session.get_inputs()}
    return {k: v for k, v in feeds.items() if k in wanted}


def _fake_uint8(x: np.ndarray) -> np.ndarray:
    """Per-tensor asymmetric uint8, as DynamicQuantizeLinear does (range includes 0)."""
    low, high = min(x.min(), 0.0), max(x.max(), 0.0)
    scale = (high - low) / 255 or 1.0
    zero = np.round(-low / scale)
    return (np.clip(np.round(x / scale) + zero, 0, 255) - zero) * scale


def _fake_int8(w: np.ndarray) -> np.ndarray:
    """Symmetric weights as quantize_dynamic stores them: 7-bit per output column, or int8."""
    levels = 63 if PER_CHANNEL else 127
    peak = np.abs(w).max(axis=0, keepdims=True) if PER_CHANNEL else np.abs(w).max()
    scale = np.where(peak > 0, peak / levels, 1.0)
    return np.clip(np.round(w / scale), -levels, levels) * scale


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
