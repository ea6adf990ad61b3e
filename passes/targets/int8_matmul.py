"""int8 MatMul for the CPU: int8 weights, activations scaled per token where that pays.

ORT's dynamic quantization (``quantize_dynamic`` → DynamicQuantizeMatMul) scales the
activations of a whole tensor by one number: one outlier token coarsens every other one, and a
sentence's result depends on what else is in the batch. Per token — a scale per row of X — a
row's result depends on that row alone (all-MiniLM-L6-v2, every product int8: worst
sentence-embedding cosine 0.980 per tensor, 0.993 per token with smoothing, measured here),
but ORT's kernels take per-row scales ~10 % slower. So each input is simulated both ways on the
calibration activations and gets the per-token form only where it cuts the rounding error by
TOKEN_GAIN; where rows are alike (random-weight BERT) per tensor is as accurate and stays.

Channel outliers — a few input features far larger than the rest, as trained BERT-family
models have — are moved into the weights first where that cuts the error by SMOOTH_GAIN, as
SmoothQuant does: X·W = (X·diag(1/s))·(diag(s)·W), exact before rounding,
s_k = max|X_k|^α / max|W_k|^(1-α) from the calibration activations.

Per token, for one input X [..., K] read by linears W_1..W_n::

    X -> Reshape [M, K] (-> Mul 1/s) -> ReduceMax, ReduceMin -> scale [M] = max|row| / 127
      -> QuantizeLinear(axis 0, zero point 128) -> uint8 [M, K]
    per W_i: MatMulInteger(Xq, Wq_i, 128) -> Cast -> Mul(scale [M, 1] · w_scale_i [N])
      -> Reshape [..., N] (-> Add bias)

which ORT fuses into MatMulIntegerToFloat (u8 × s8; s8 × s8 ran ~8× slower here). Per tensor:
(Mul 1/s ->) DynamicQuantizeMatMul(X, Wq_i, w_scale_i). Weights are symmetric per output
column, in 8 bits (±127) where the CPU compiling has VNNI (or is not x86) and in 7 bits (±63)
otherwise: ORT's x86 kernel without VNNI adds pairs of u8·s8 products in int16, and 2·255·63 is
the most that cannot saturate. The model records which, so running an 8-bit model on a CPU
without VNNI is flagged (:func:`saturation_warning`).
"""

from __future__ import annotations

import dataclasses
import functools
import platform

import numpy as np
import onnx_ir as ir

from txcompile.graph.build import GraphBuilder
from txcompile.graph.nodes import MS_DOMAIN

ACTIVATION_LEVELS = 127  # symmetric per token, stored as uint8 around 128
ZERO_POINT = 128
WEIGHT_BITS_KEY = "txcompile.int8_weight_bits"
ALPHA = 0.5  # SmoothQuant's balance; a per-input search on calibration rows generalized worse
# Each costs a pass over the activations: taken only for a clear cut in simulated error. Chosen
# on MiniLM, every input per token: smoothing where it gains 15 / 25 / 40 % gave worst cosines
# 0.9923 / 0.9927 / 0.9908.
SMOOTH_GAIN = 0.25
# Per token where it cuts the simulated error by 20 / 30 / 40 / 50 %: 13 / 9 / 5 / 4 of MiniLM's
# 24 inputs, worst cosine over 256 sentences 0.9975 / 0.9975 / 0.9974 / 0.9970 against fp32,
# one sentence 1.67 / - / 1.58 / 1.58 ms (the per-row scale's ops cost a sentence ~18 µs each).
TOKEN_GAIN = 0.4
SAMPLE_ROWS = 512  # calibration rows the simulations look at
ACTIVATION_MODES = ("auto", "token", "tensor")  # --int8-activations


@dataclasses.dataclass
class Scheme:
    """How one input is quantized: per token or per tensor, smoothed by ``divisor`` or not."""

    per_token: bool
    divisor: np.ndarray | None
    errors: list[float]  # simulated relative error of each product reading this input

    @property
    def error(self) -> float:
        return float(sum(self.errors))


def smoothing_divisor(x_peak: np.ndarray, weights: list[np.ndarray], alpha: float) -> np.ndarray:
    """s_k = max|X_k|^α / max|W_k|^(1-α): the SmoothQuant balance between the two ranges. A
    channel whose weights are all zero is divided by its own peak (it adds nothing anyway)."""
    w_peak = np.max([np.abs(w).max(axis=1) for w in weights], axis=0)
    s = np.maximum(x_peak, 1e-5) ** alpha / np.maximum(w_peak, 1e-5) ** (1.0 - alpha)
    s = np.where(w_peak > 0, s, np.maximum(x_peak, 1.0))
    return np.where(x_peak > 0, s, 1.0).astype(np.float32)


@functools.cache
def saturates_at_8_bits() -> bool:
    """Whether ORT's u8 × s8 kernel on this CPU sums products in int16: x86 without VNNI."""
    if platform.machine().lower() not in ("x86_64", "amd64", "i386", "i686"):
        return False
    try:
        with open("/proc/cpuinfo") as info:
            flags = next((line.split(":", 1)[1].split() for line in info if line.startswith("flags")), [])
    except OSError:
        return True  # cannot tell: the bits that are safe everywhere
    return not {"avx512_vnni", "avx_vnni", "amx_int8"} & set(flags)


def weight_bits() -> int:
    return 7 if saturates_at_8_bits() else 8


def saturation_warning(bits: int | None) -> str | None:
    """A line to show before running a model with ``bits``-bit int8 weights on this CPU."""
    if bits == 8 and saturates_at_8_bits():
        return (
            "this model's int8 weights use 8 bits, which ORT's int8 kernel on this CPU (x86 "
            "without VNNI) can saturate: results may be off; compile it on this CPU for 7-bit weights"
        )
    return None


def quantize_weight(w: np.ndarray, bits: int = 8) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric per output column: (int8 [K, N] in ±(2^(bits-1) - 1), float32 scale [N])."""
    levels = 2 ** (bits - 1) - 1
    peak = np.abs(w).max(axis=0)
    scale = np.where(peak > 0, peak / levels, 1.0).astype(np.float32)
    return np.clip(np.rint(w / scale), -levels, levels).astype(np.int8), scale


def simulate(
    x: np.ndarray,
    w: np.ndarray,
    divisor: np.ndarray | None = None,
    bits: int = 8,
    per_token: bool = True,
    span: tuple[float, float] | None = None,
) -> np.ndarray:
    """What the int8 graph computes for x [T, K] @ w [K, N], in float64. Per tensor, ``span``
    is the (min, max) the whole batch has (default: x's own)."""
    x, w = x.astype(np.float64), w.astype(np.float64)
    if divisor is not None:
        x, w = x / divisor, w * divisor[:, None]
    if per_token:
        row_scale = np.abs(x).max(axis=1, keepdims=True) / ACTIVATION_LEVELS
        row_scale = np.where(row_scale > 0, row_scale, 1.0)
        xq = np.clip(np.rint(x / row_scale), -ACTIVATION_LEVELS, ACTIVATION_LEVELS) * row_scale
    else:  # DynamicQuantizeLinear: uint8 over [min(x, 0), max(x, 0)]
        low, high = span if span is not None else (x.min(), x.max())
        low, high = min(low, 0.0), max(high, 0.0)
        scale = (high - low) / 255 or 1.0
        zero = np.clip(np.rint(-low / scale), 0, 255)
        xq = (np.clip(np.rint(x / scale) + zero, 0, 255) - zero) * scale
    wq, w_scale = quantize_weight(w, bits)
    return xq @ (wq.astype(np.float64) * w_scale)


def relative_error(
    x: np.ndarray, w: np.ndarray, divisor: np.ndarray | None = None, bits: int = 8, **how
) -> float:
    """Mean over tokens of |error| / |exact| for each token's product row: every token counts
    alike, as it does after the LayerNorm that follows (a Frobenius norm would let the few
    large-norm tokens decide)."""
    exact = x.astype(np.float64) @ w.astype(np.float64)
    error = np.linalg.norm(simulate(x, w, divisor, bits, **how) - exact, axis=1)
    return float(np.mean(error / np.maximum(np.linalg.norm(exact, axis=1), 1e-30)))


def choose_scheme(
    rows: np.ndarray | None, weights: list[np.ndarray], bits: int = 8, mode: str = "auto"
) -> Scheme:
    """``auto``: per tensor unless per token cuts the simulated error by TOKEN_GAIN; smoothed
    where that cuts it by SMOOTH_GAIN. Without calibration rows: unsmoothed, per token unless
    ``tensor`` is asked for."""
    if rows is None or not len(rows):
        return Scheme(mode != "tensor", None, [float("nan")] * len(weights))
    divisor = smoothing_divisor(np.abs(rows).max(axis=0), weights, ALPHA)
    # per tensor, the scale comes from the whole batch: its span over every calibration row
    spans = {None: (float(rows.min()), float(rows.max()))}
    smoothed = rows / divisor
    spans["smoothed"] = (float(smoothed.min()), float(smoothed.max()))
    if len(rows) > SAMPLE_ROWS:
        rows = rows[np.random.default_rng(0).choice(len(rows), SAMPLE_ROWS, replace=False)]

    def best(per_token: bool) -> Scheme:
        def errors(d):
            span = spans["smoothed" if d is not None else None]
            return [relative_error(rows, w, d, bits, per_token=per_token, span=span) for w in weights]

        plain, cut = Scheme(per_token, None, errors(None)), Scheme(per_token, divisor, errors(divisor))
        return cut if cut.error <= (1.0 - SMOOTH_GAIN) * plain.error else plain

    if mode != "auto":
        return best(mode == "token")
    token, tensor = best(True), best(False)
    return token if token.error <= (1.0 - TOKEN_GAIN) * tensor.error else tensor


def calibration_rows(value: np.ndarray) -> np.ndarray:
    """Rows [T, K] of an activation recorded for one input (every position of every sample)."""
    return np.asarray(value, dtype=np.float32).reshape(-1, value.shape[-1])


class Emitter:
    """Builds the int8 graph with a GraphBuilder: one quantization per input, one product per linear."""

    def __init__(self, builder: GraphBuilder, opset: int, bits: int) -> None:
        self.builder, self.opset, self.bits = builder, opset, bits

    def const(self, array: np.ndarray) -> ir.Value:
        return self.builder.const(np.ascontiguousarray(array))

    def _reduce(self, op: str, x: ir.Value) -> ir.Value:
        return self.builder.axes_op(op, x, [-1], self.opset, keepdims=0)

    def quantize(self, x: ir.Value, k: int, scheme: Scheme) -> tuple[ir.Value, ir.Value | None]:
        """Per token: (uint8 X [M, K], its per-row scale [M, 1]); per tensor: (X, smoothed if
        asked, None) — DynamicQuantizeMatMul quantizes it itself."""
        b = self.builder
        if not scheme.per_token:
            return self._smooth(x, scheme.divisor), None
        flat = self._smooth(b.op("Reshape", x, self.const(np.array([-1, k], np.int64))), scheme.divisor)
        peak = b.op("Max", self._reduce("ReduceMax", flat), b.op("Neg", self._reduce("ReduceMin", flat)))
        scale = b.op("Mul", peak, self.const(np.array(1.0 / ACTIVATION_LEVELS, np.float32)))
        # an all-zero row quantizes to zeros; the floor only keeps the division finite
        scale = b.op("Max", scale, self.const(np.array(1e-30, np.float32)))
        zero = b.op(
            "ConstantOfShape", b.op("Shape", scale), value=ir.tensor(np.array([ZERO_POINT], np.uint8))
        )
        quantized = b.op("QuantizeLinear", flat, scale, zero, axis=0)
        column = b.op("Unsqueeze", scale, self.const(np.array([1], np.int64)))
        return quantized, column

    def _smooth(self, x: ir.Value, divisor: np.ndarray | None) -> ir.Value:
        if divisor is None:
            return x
        return self.builder.op("Mul", x, self.const((1.0 / divisor).astype(np.float32)))

    def product(
        self,
        x: ir.Value,
        quantized: ir.Value,
        row_scale: ir.Value | None,
        weight: np.ndarray,
        divisor: np.ndarray | None,
        bias: ir.Value | None,
    ) -> ir.Value:
        """X @ W (+ bias) in int8, shaped like X with its last axis N."""
        b = self.builder
        w = weight.astype(np.float32)
        if divisor is not None:
            w = w * divisor[:, None]
        wq, w_scale = quantize_weight(w, self.bits)
        if row_scale is None:  # a [N] bias goes into the op: one pass over the output fewer
            inner = bias if bias is not None and _is_vector(bias, w.shape[1]) else None
            operands = [quantized, self.const(wq), self.const(w_scale)] + ([None, inner] if inner else [])
            out = b.op("DynamicQuantizeMatMul", *operands, domain=MS_DOMAIN)
            return out if bias is None or inner is not None else b.op("Add", out, bias)
        acc = b.op("MatMulInteger", quantized, self.const(wq), self.const(np.array(ZERO_POINT, np.uint8)))
        scales = b.op("Mul", row_scale, self.const(w_scale))
        out = b.op("Mul", b.op("Cast", acc, to=ir.DataType.FLOAT), scales)
        lead = b.op("Shape", x, end=-1)
        shape = b.op("Concat", lead, self.const(np.array([w.shape[1]], np.int64)), axis=0)
        out = b.op("Reshape", out, shape)
        # after the Reshape: ORT 1.32 fuses an Add right after the Mul into MatMulIntegerToFloat's
        # bias, which that kernel then drops when the A scale is per row (measured here)
        return out if bias is None else b.op("Add", out, bias)


def _is_vector(value: ir.Value, size: int) -> bool:
    return value.const_value is not None and tuple(value.const_value.shape) == (size,)


def bias_add(linear_output: ir.Value, size: int) -> tuple[ir.Node, ir.Value] | None:
    """The Add of a constant [size] float32 bias that alone reads a product's output, and that bias."""
    uses = list(linear_output.uses())
    if len(uses) != 1 or linear_output.is_graph_output():
        return None
    add = uses[0].node
    if add.op_type != "Add" or add.domain not in ("", "ai.onnx") or len(add.inputs) != 2:
        return None
    other = add.inputs[1 - uses[0].idx]
    if other is None or not _is_vector(other, size) or other.const_value.dtype != ir.DataType.FLOAT:
        return None
    return add, other
