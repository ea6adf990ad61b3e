"""Encrypted execution of a polynomial graph with TenSEAL (CKKS), checked against ORT.

Each element of an encrypted tensor is its own CKKS ciphertext (a numpy object array of
``CKKSVector``), so every ONNX op keeps its numpy semantics — broadcasting, matmul, sums,
reshapes — and the code stays an interpreter rather than a packing compiler. That is slow and
meant for small blocks (an MLP, an attention head, a few tokens), which is what it is for: to
show the polynomial graph really evaluates under encryption within the stated error.

Plaintext work (weights, masks, the client's token lookup) runs in the clear; values that
depend on the encrypted inputs are encrypted, the same split :mod:`..passes.polynomial.contract`
checks. Graphs deeper than the level budget are refused before any key is made.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import numpy as np
import onnx
import onnx_ir as ir
from onnx.reference import ReferenceEvaluator

from txcompile.graph import ort as rt
from txcompile.graph.ckks import ciphertext_values, violations
from txcompile.graph.depth import depth_report
from txcompile.graph.errors import TxError

SCALE_BITS = 40


@dataclasses.dataclass
class EncryptedRun:
    outputs: dict[str, np.ndarray]
    plaintext: dict[str, np.ndarray]
    max_diff: float
    seconds: float
    depth: int
    parameters: dict[str, Any]
    ciphertexts: int


def _tenseal():
    try:
        import tenseal
    except ImportError:
        raise TxError("encrypted execution needs TenSEAL: pip install 'txcompile[he]'") from None
    return tenseal


def make_context(depth: int, scale_bits: int = SCALE_BITS):
    """The smallest 128-bit-secure CKKS context with ``depth`` rescales (parameters from depth.py)."""
    from txcompile.graph.depth import suggest_ckks

    params = None
    for bits in dict.fromkeys((scale_bits, 30)):  # 30 bits (~1e-3 noise) only where no ring fits more
        params = suggest_ckks(depth, bits)
        if params:
            scale_bits = bits
            break
    if params is None:
        raise TxError(f"no CKKS ring fits depth {depth} without bootstrapping")
    ts = _tenseal()
    context = ts.context(
        ts.SCHEME_TYPE.CKKS,
        poly_modulus_degree=params["poly_modulus_degree"],
        coeff_mod_bit_sizes=params["coeff_mod_bit_sizes"],
    )
    context.global_scale = 2**scale_bits
    return context, params


def run_encrypted(
    model: onnx.ModelProto, feeds: dict[str, np.ndarray], level_budget: int | None = None
) -> EncryptedRun:
    ir_model = ir.serde.deserialize_model(model)
    problems = violations(ir_model.graph)
    if problems:
        raise TxError(f"not a polynomial graph (compile with --target he first): {problems[0]}")
    report = depth_report(ir_model, level_budget, SCALE_BITS)
    depth = report["depth"]
    if level_budget is not None and depth > level_budget:
        raise TxError(
            f"the graph needs {depth} levels; the budget is {level_budget} (bootstrapping unsupported)"
        )
    context, params = make_context(depth)
    plaintext = rt.run(rt.create_session(model), feeds)
    start = time.perf_counter()
    evaluator = _Evaluator(context, ir_model.graph, model)
    outputs = evaluator.run(feeds)
    seconds = time.perf_counter() - start
    return EncryptedRun(
        outputs=outputs,
        plaintext=plaintext,
        max_diff=rt.max_abs_diff(plaintext, outputs),
        seconds=seconds,
        depth=depth,
        parameters=params | {"multiplications": report["multiplications"]},
        ciphertexts=evaluator.encrypted_count,
    )


class _Evaluator:
    def __init__(self, context, graph: ir.Graph, proto: onnx.ModelProto) -> None:
        self.context = context
        self.graph = graph
        self.encrypted = {v.name for v in ciphertext_values(graph)}
        self.protos = {n.name: n for n in proto.graph.node}
        self.opset = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), 18)
        self.encrypted_count = 0

    def encrypt(self, array: np.ndarray) -> np.ndarray:
        ts = _tenseal()
        flat = [ts.ckks_vector(self.context, [float(v)]) for v in np.ravel(array)]
        self.encrypted_count += len(flat)
        out = np.empty(len(flat), dtype=object)
        out[:] = flat
        return out.reshape(np.shape(array))

    def zero(self):
        return _tenseal().ckks_vector(self.context, [0.0])

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        env: dict[str, Any] = {}
        for name, tensor in self.graph.initializers.items():
            env[name] = tensor.const_value.numpy()
        for value in self.graph.inputs:
            array = np.asarray(feeds[value.name])
            env[value.name] = self.encrypt(array) if value.name in self.encrypted else array
        last_use = {}
        for position, node in enumerate(self.graph):
            for v in node.inputs:
                if v is not None:
                    last_use[v.name] = position
        keep = {v.name for v in self.graph.outputs}
        for position, node in enumerate(self.graph):
            inputs = [env[v.name] if v is not None else None for v in node.inputs]
            for v in node.inputs:  # ciphertexts are megabytes each: drop what nothing reads again
                if v is not None and last_use.get(v.name) == position and v.name not in keep:
                    env.pop(v.name, None)
            if not any(isinstance(x, np.ndarray) and x.dtype == object for x in inputs if x is not None):
                results = self._plain(node, inputs)
                results = [
                    self.encrypt(r) if node.outputs[i].name in self.encrypted and r.dtype.kind == "f" else r
                    for i, r in enumerate(results)
                ]
            else:
                try:
                    results = _encrypted_op(node, inputs, self.zero)
                except ValueError as err:  # TenSEAL: out of levels or scale
                    raise TxError(f"CKKS evaluation failed at {node.op_type} {node.name!r}: {err}") from None
            for value, result in zip(node.outputs, results, strict=False):
                env[value.name] = result
        return {v.name: _decrypt(env[v.name]) for v in self.graph.outputs}

    def _plain(self, node: ir.Node, inputs: list) -> list[np.ndarray]:
        proto = self.protos.get(node.name) or ir.serde.serialize_node(node)
        names = [f"in{i}" if x is not None else "" for i, x in enumerate(inputs)]
        clean = onnx.NodeProto()
        clean.CopyFrom(proto)
        del clean.input[:]
        clean.input.extend(names)
        del clean.output[:]
        clean.output.extend(f"out{i}" for i in range(len(node.outputs)))
        evaluator = ReferenceEvaluator(clean)
        feeds = {name: x for name, x in zip(names, inputs, strict=True) if name}
        return [np.asarray(r) for r in evaluator.run(None, feeds)]


def _decrypt(value) -> np.ndarray:
    if isinstance(value, np.ndarray) and value.dtype == object:
        return np.vectorize(lambda c: c.decrypt()[0], otypes=[np.float64])(value).astype(np.float32)
    return np.asarray(value)


def _attrs(node: ir.Node) -> dict[str, Any]:
    return {k: a.value for k, a in node.attributes.items()}


def _ints(x) -> list[int]:
    return [int(v) for v in np.ravel(x)]


def _mul(a, b, zero):
    """Elementwise product. CKKS refuses a product with a plaintext 0, so that term becomes a
    fresh encryption of 0 (``zero()``)."""
    if isinstance(b, np.ndarray) and b.dtype != object:
        a, b = b, a
    if isinstance(a, np.ndarray) and a.dtype != object:
        a, b = np.broadcast_arrays(a, b)
        out = np.empty(a.shape, dtype=object)
        for index in np.ndindex(a.shape):
            out[index] = _times(b[index], float(a[index]), zero)
        return out
    return _binary(a, b, lambda u, v: u * v)


def _is_cipher(value) -> bool:
    return hasattr(value, "decrypt")


def _level(cipher) -> int:
    return cipher.data.ciphertext()[0].coeff_modulus_size()


def _fresh(cipher):
    """A new ciphertext equal to ``cipher``. Two negations: TenSEAL's ``copy()`` costs ~0.1 s."""
    return cipher.neg().neg()


def _aligned(u, v):
    """TenSEAL mod-switches the higher-level operand in place to match the other, which would
    silently push a value shared by other users down the modulus chain: hand it a fresh one."""
    if _is_cipher(u) and _is_cipher(v):
        if _level(u) > _level(v):
            return _fresh(u), v
        if _level(v) > _level(u):
            return u, _fresh(v)
    return u, v


def _binary(a, b, fn):
    """Elementwise on object arrays of ciphertexts and floats."""
    a, b = np.broadcast_arrays(np.asarray(a, dtype=object), np.asarray(b, dtype=object))
    out = np.empty(a.shape, dtype=object)
    for index in np.ndindex(a.shape):
        out[index] = fn(*_aligned(a[index], b[index]))
    return out


def _times(c, k: float, zero):
    """ciphertext × plaintext scalar; small integers by additions (no level, as depth.py counts)."""
    if k == 0:
        return zero()
    if k.is_integer() and abs(k) <= 8:
        total = c
        for _ in range(int(abs(k)) - 1):
            total = total + c
        return total if k > 0 else -total
    return c * k


def _add(u, v):
    u, v = _aligned(u, v)
    return u + v


def _matmul(a, b, zero):
    if a.ndim == 2 and b.ndim == 2:
        out = np.empty((a.shape[0], b.shape[1]), dtype=object)
        for i in range(a.shape[0]):
            for j in range(b.shape[1]):
                terms = _mul(a[i, :], b[:, j], zero)
                total = terms[0]
                for term in terms[1:]:
                    total = _add(total, term)
                out[i, j] = total
        return out
    shape = np.broadcast_shapes(a.shape[:-2], b.shape[:-2])
    a = np.broadcast_to(a, (*shape, *a.shape[-2:]))
    b = np.broadcast_to(b, (*shape, *b.shape[-2:]))
    out = np.empty((*shape, a.shape[-2], b.shape[-1]), dtype=object)
    for index in np.ndindex(*shape):
        out[index] = _matmul(a[index], b[index], zero)
    return out


def _encrypted_op(node: ir.Node, x: list, zero) -> list:
    op, attrs = node.op_type, _attrs(node)
    if op == "Add":
        return [_binary(x[0], x[1], lambda u, v: u + v)]
    if op == "Sub":
        return [_binary(x[0], x[1], lambda u, v: u - v)]
    if op == "Neg":
        return [-x[0]]
    if op == "Mul":
        return [_mul(x[0], x[1], zero)]
    if op == "MatMul":
        return [_matmul(np.asarray(x[0]), np.asarray(x[1]), zero)]
    if op == "Gemm":
        a = x[0].T if attrs.get("transA") else x[0]
        b = x[1].T if attrs.get("transB") else x[1]
        out = _mul(_matmul(a, b, zero), np.asarray(attrs.get("alpha", 1.0)), zero)
        if len(x) > 2 and x[2] is not None:
            out = out + _mul(np.asarray(x[2]), np.asarray(attrs.get("beta", 1.0)), zero)
        return [out]
    if op in ("ReduceSum", "ReduceMean"):
        axes = tuple(_ints(x[1])) if len(x) > 1 and x[1] is not None else attrs.get("axes")
        keep = bool(attrs.get("keepdims", 1))
        total = _sum(x[0], tuple(axes) if axes is not None else tuple(range(x[0].ndim)), keep)
        if op == "ReduceMean":
            count = x[0].size // np.asarray(total).size
            total = _mul(np.asarray(total, dtype=object), np.asarray(1.0 / count), zero)
        return [np.asarray(total, dtype=object)]
    if op == "Pow":
        return [np.vectorize(lambda c: _power(c.copy(), int(np.ravel(x[1])[0])), otypes=[object])(x[0])]
    return [_move(op, attrs, x)]


def _sum(data: np.ndarray, axes: tuple[int, ...], keepdims: bool) -> np.ndarray:
    axes = tuple(sorted(a % data.ndim for a in axes))
    moved = np.moveaxis(data, axes, tuple(range(data.ndim - len(axes), data.ndim)))
    rest = moved.shape[: data.ndim - len(axes)]
    flat = moved.reshape(*rest, -1)
    out = np.empty(rest, dtype=object)
    for index in np.ndindex(*rest):
        values = flat[index]
        total = values[0]
        for value in values[1:]:
            total = _add(total, value)
        out[index] = total
    if keepdims:
        for axis in axes:
            out = np.expand_dims(out, axis)
    return out


def _power(c, n: int):
    result, base = None, c
    while n:
        if n & 1:
            result = base if result is None else result * base
        n >>= 1
        if n:
            base = base * base
    return result


def _move(op: str, attrs: dict, x: list) -> np.ndarray:
    data = x[0]
    if op in ("Identity",):
        return data
    if op == "Reshape":
        shape = _ints(x[1])
        if not attrs.get("allowzero", 0):
            shape = [data.shape[i] if s == 0 else s for i, s in enumerate(shape)]
        return data.reshape(shape)
    if op == "Transpose":
        return np.transpose(data, attrs.get("perm"))
    if op == "Unsqueeze":
        out = data
        for axis in sorted(a % (data.ndim + len(_ints(x[1]))) for a in _ints(x[1])):
            out = np.expand_dims(out, axis)
        return out
    if op == "Squeeze":
        axes = tuple(_ints(x[1])) if len(x) > 1 and x[1] is not None else None
        return np.squeeze(data, axis=axes)
    if op == "Flatten":
        axis = attrs.get("axis", 1) % max(data.ndim, 1)
        return data.reshape(int(np.prod(data.shape[:axis])), -1)
    if op == "Slice":
        starts, ends = _ints(x[1]), _ints(x[2])
        axes = _ints(x[3]) if len(x) > 3 and x[3] is not None else list(range(len(starts)))
        steps = _ints(x[4]) if len(x) > 4 and x[4] is not None else [1] * len(starts)
        index = [slice(None)] * data.ndim
        for s, e, a, st in zip(starts, ends, axes, steps, strict=True):
            index[a] = slice(s, e, st)
        return data[tuple(index)]
    if op == "Concat":
        parts = [np.asarray(p, dtype=object) for p in x]
        return np.concatenate(parts, axis=attrs["axis"])
    if op == "Gather":
        return np.take(data, np.asarray(x[1]).astype(np.int64), axis=attrs.get("axis", 0))
    if op == "Expand":
        shape = np.broadcast_shapes(data.shape, tuple(_ints(x[1])))
        return np.broadcast_to(data, shape).copy()
    if op == "Shape":
        return np.asarray(data.shape, dtype=np.int64)
    raise TxError(f"encrypted execution does not support {op}")
