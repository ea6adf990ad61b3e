"""Find attention sites structurally: a Softmax between two MatMuls, however the exporter wrote it.

A site is read from the Softmax outward. Above it, towards the Q·Kᵀ MatMul, the score chain may
hold scalar scales (``Mul``/``Div`` by a constant, as eager attention writes them), additive
biases (padding / causal masks, T5 and Swin position biases) and ``Where(mask, scores, -big)``
fills (sdpa exports); below it, the NaN guard that dynamo writes for sdpa
(``Where(IsNaN(p), 0, p)``) and then the P·V MatMul. Scales applied to Q and Kᵀ before the
product (torch's sdpa decomposition splits √scale over both) are absorbed too. A soft-cap
c·tanh(scores / c) (Gemma 2) is read as the site's ``softcap``; nothing may be added under it.

Every Softmax becomes a :class:`Site`; one that does not read as attention keeps the first
check that failed in ``reason``, so the coverage report can say why it stayed unfused.
This is the structural half of the read rule; read.py adds shapes and layout.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import onnx_ir as ir

# Where-fills at or below this are masks: adding them to a score zeroes its probability exactly.
MASK_FILL_LIMIT = -1e9
ELEMENTWISE = frozenset({"Add", "Sub", "Mul", "Div", "Where", "Cast", "Tanh"})
SEARCH_DEPTH = 8
SCORE_OPS = frozenset({"Add", "Mul", "Div", "Where", "Tanh"})  # what may sit between Q·Kᵀ and the Softmax


@dataclasses.dataclass
class BiasTerm:
    """One additive term of the score chain, times ``factor`` (the scales applied after it).

    ``kind`` is ``add`` (``value`` is added), ``fill-true`` (``Where(value, fill, scores)``: the
    fill lands where ``value`` is true) or ``fill-false`` (``Where(value, scores, fill)``).
    """

    kind: str
    value: ir.Value
    factor: float = 1.0
    fill: float = 0.0

    def signature(self) -> tuple:
        return (self.kind, id(self.value), self.factor, self.fill)

    def added(self, value: np.ndarray) -> np.ndarray:
        """What this term adds to the scores, given ``value``'s array (float64)."""
        if self.kind == "add":
            return np.asarray(value, dtype=np.float64) * self.factor
        fill = self.fill * self.factor
        return np.where(value, 0.0, fill) if self.kind == "fill-false" else np.where(value, fill, 0.0)


@dataclasses.dataclass
class Site:
    softmax: ir.Node
    reason: str | None = None
    qk: ir.Node | None = None
    pv: ir.Node | None = None
    query: ir.Value | None = None  # [B, N, S, D], scales stripped
    key_t: ir.Value | None = None  # [B, N, D, L], scales stripped
    value: ir.Value | None = None  # [B, N, L, D]
    scale: float = 1.0
    biases: list[BiasTerm] = dataclasses.field(default_factory=list)
    chain: list[ir.Node] = dataclasses.field(default_factory=list)  # nodes the fusion replaces
    guarded: bool = False  # Where(IsNaN(p), 0, p) below the Softmax: a fully masked row gives 0
    softcap: float = 0.0  # c of c·tanh(scores / c) on the scaled scores (Gemma 2), 0: none

    @property
    def name(self) -> str:
        return self.softmax.name or (self.softmax.outputs[0].name or "?")

    def fail(self, reason: str) -> Site:
        self.reason = self.reason or reason
        return self


def scalar_constant(value: ir.Value | None) -> float | None:
    """The value as a Python float when it is a one-element constant, else None."""
    tensor = ir.convenience.get_const_tensor(value) if value is not None else None
    if tensor is None:
        return None
    array = tensor.numpy()
    if array.size != 1 or not np.issubdtype(array.dtype, np.floating):
        return None
    return float(array.reshape(()))


def _single_use(value: ir.Value) -> bool:
    return len(value.uses()) == 1 and not value.is_graph_output()


def _reaches_matmul(value: ir.Value | None, depth: int = SEARCH_DEPTH, through=ELEMENTWISE) -> bool:
    """Whether a MatMul lies above ``value`` through ``through`` ops only (elementwise ops)."""
    producer = value.producer() if value is not None else None
    if producer is None or depth == 0:
        return False
    if producer.op_type == "MatMul":
        return True
    if producer.op_type not in through:
        return False
    return any(_reaches_matmul(v, depth - 1, through) for v in producer.inputs)


def _strip_scales(value: ir.Value) -> tuple[ir.Value, float]:
    """Follow ``Mul``/``Div`` by scalar constants upward; return the unscaled value and the factor."""
    factor = 1.0
    while (producer := value.producer()) is not None and producer.op_type in ("Mul", "Div"):
        a, b = producer.inputs
        constant = scalar_constant(b)
        if constant is None and producer.op_type == "Mul":
            a, constant = b, scalar_constant(a)
        if constant is None or constant == 0:
            break
        factor = factor * constant if producer.op_type == "Mul" else factor / constant
        value = a
    return value, factor


def read_site(softmax: ir.Node, opset: int) -> Site:
    site = Site(softmax)
    if opset < 13:
        return site.fail(f"opset {opset} Softmax flattens its input (needs opset >= 13)")
    axis = softmax.attributes.get_int("axis", -1)
    if axis not in (-1, 3):
        return site.fail(f"Softmax over axis {axis}, not the last")
    _read_scores(site)
    if site.reason is None:
        _read_probabilities(site)
    return site


def _read_scores(site: Site) -> None:
    """Walk from the Softmax input up to the Q·Kᵀ MatMul, collecting scales and biases."""
    scores = site.softmax.inputs[0]
    factor = 1.0
    for _ in range(SEARCH_DEPTH):
        node = scores.producer()
        if node is None:
            site.fail("no MatMul above the Softmax")
            return
        if node.op_type == "MatMul":
            break
        if node.op_type not in SCORE_OPS:
            site.fail(f"no MatMul above the Softmax ({node.op_type} {node.name} in the way)")
            return
        if not _single_use(scores):
            site.fail(f"score tensor {scores.name} has another consumer")
            return
        site.chain.append(node)
        capped = _soft_cap(node)
        if capped is not None:
            if site.softcap or factor != 1.0:
                site.fail(f"{node.op_type} {node.name}: a second soft-cap, or a scale after it")
                return
            site.softcap, below, scores = capped
            site.chain.extend(below)
            factor = site.softcap  # the capped scores are c · y
            continue
        if site.softcap and node.op_type != "Mul" and node.op_type != "Div":
            site.fail(f"{node.op_type} {node.name} adds to the scores inside the soft-cap")
            return
        on_path = [i for i, v in enumerate(node.inputs) if _reaches_matmul(v) or _is_matmul_output(v)]
        if len(on_path) != 1:
            site.fail(f"{node.op_type} {node.name} does not lead to exactly one MatMul")
            return
        index = on_path[0]
        other = [v for i, v in enumerate(node.inputs) if i != index]
        if node.op_type == "Add":
            site.biases.append(BiasTerm("add", other[0], factor))
        elif node.op_type == "Mul" or (node.op_type == "Div" and index == 0):
            constant = scalar_constant(other[0])
            if constant is None or constant == 0:
                site.fail(f"{node.op_type} {node.name} scales the scores by a non-constant")
                return
            factor = factor * constant if node.op_type == "Mul" else factor / constant
        elif node.op_type == "Where" and index in (1, 2):
            fill = scalar_constant(node.inputs[3 - index])
            if fill is None or fill > MASK_FILL_LIMIT:
                site.fail(f"Where {node.name} fills with {fill}, not a mask value")
                return
            kind = "fill-false" if index == 1 else "fill-true"
            site.biases.append(BiasTerm(kind, node.inputs[0], factor, fill))
        else:
            site.fail(f"{node.op_type} {node.name} of this form between the MatMul and the Softmax")
            return
        scores = node.inputs[index]
    else:
        site.fail("score chain too long")
        return
    site.qk = scores.producer()
    if not _single_use(scores):
        site.fail(f"Q·Kᵀ product {scores.name} has another consumer")
        return
    site.chain.append(site.qk)
    query, q_factor = _strip_scales(site.qk.inputs[0])
    key_t, k_factor = _strip_scales(site.qk.inputs[1])
    site.query, site.key_t = query, key_t
    site.scale = factor * q_factor * k_factor
    if not math.isfinite(site.scale):
        site.fail("the scale is not finite")


def _soft_cap(node: ir.Node) -> tuple[float, list[ir.Node], ir.Value] | None:
    """(c, the Tanh, y) when ``node`` is c · tanh(y) with c a positive scalar constant (or the
    Tanh itself: c = 1). That is a soft-cap of c · y exactly, whatever wrote y: Gemma 2's
    c · tanh(scores / c), with the exporter folding /c into the scale or dropping it at c = 1."""
    if node.op_type == "Tanh":
        return 1.0, [], node.inputs[0]
    if node.op_type != "Mul":
        return None
    for index in (0, 1):
        cap, tanh = scalar_constant(node.inputs[1 - index]), node.inputs[index].producer()
        if cap is not None and cap > 0 and tanh is not None and tanh.op_type == "Tanh":
            if _single_use(tanh.outputs[0]):
                return cap, [tanh], tanh.inputs[0]
    return None


def _is_matmul_output(value: ir.Value | None) -> bool:
    return value is not None and value.producer() is not None and value.producer().op_type == "MatMul"


def _read_probabilities(site: Site) -> None:
    """Below the Softmax: an optional NaN guard, then the P·V MatMul."""
    probs = site.softmax.outputs[0]
    site.chain.append(site.softmax)
    uses = [user for user, _ in probs.uses()]
    while (
        len(uses) == 1 and uses[0].op_type == "Cast" and uses[0].attributes.get_int("to") == ir.DataType.FLOAT
    ):
        site.chain.append(uses[0])  # TorchScript's no-op Casts back to float
        probs = uses[0].outputs[0]
        uses = [user for user, _ in probs.uses()]
    if probs.is_graph_output():
        site.fail("the attention probabilities are a graph output")
        return
    if len(uses) == 2 and {u.op_type for u in uses} == {"IsNaN", "Where"}:
        isnan = next(u for u in uses if u.op_type == "IsNaN")
        guard = next(u for u in uses if u.op_type == "Where")
        zero = scalar_constant(guard.inputs[1])
        if not (
            guard.inputs[0] is isnan.outputs[0]
            and guard.inputs[2] is probs
            and zero == 0.0
            and _single_use(isnan.outputs[0])
        ):
            site.fail("Softmax output has another consumer")
            return
        site.chain.extend([isnan, guard])
        site.guarded = True
        probs = guard.outputs[0]
        uses = [user for user, _ in probs.uses()]
    if len(uses) != 1 or probs.is_graph_output():
        site.fail(f"Softmax output {probs.name} has another consumer")
        return
    pv = uses[0]
    if pv.op_type != "MatMul" or pv.inputs[0] is not probs:
        site.fail(f"the probabilities feed {pv.op_type}, not the P·V MatMul")
        return
    site.pv = pv
    site.value = pv.inputs[1]
    site.chain.append(pv)


def find_sites(graph: ir.Graph, opset: int) -> list[Site]:
    """Every Softmax of the graph as a site, in graph order."""
    return [read_site(node, opset) for node in graph if node.op_type == "Softmax" and node.domain == ""]
