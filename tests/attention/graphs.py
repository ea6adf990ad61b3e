"""Hand-built attention blocks, written the ways exporters write them, for per-rule tests."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
from onnx import TensorProto, helper, numpy_helper

from txcompile.graph import ort as rt
from txcompile.passes.base import PassContext

BATCH, SEQ, HEADS, HEAD_DIM = 2, 6, 4, 8
HIDDEN = HEADS * HEAD_DIM
MIN = float(np.finfo(np.float32).min)


def attention_block(
    *,
    scale_where: str = "scores",  # "scores" (Div after Q·Kᵀ), "qk" (√scale on Q and Kᵀ), "none"
    mask: str = "add",  # "add" (additive 2-D padding bias), "where" (Where fill), "none"
    nan_guard: bool = False,
    extra_output: str | None = None,  # "scores" or "probs": an intermediate another consumer reads
    softmax_axis: int = -1,
    with_softmax_input_from_matmul: bool = True,
    kv_source: str = "x",  # "memory": K and V project a second input (cross-attention)
    packed_qkv: bool = False,  # one [hidden, 3·hidden] projection split in three (ViT, GPT-2)
    softcap: float = 0.0,  # c · tanh(scores / c) before the mask (Gemma 2), 0: none
) -> onnx.ModelProto:
    """x [B, S, hidden], attention_mask [B, S] → one BERT-style self-attention (no out projection)."""
    rng = np.random.default_rng(0)
    inits, nodes = [], []

    def const(name, array):
        inits.append(numpy_helper.from_array(np.asarray(array), name))
        return name

    split = const("split_shape", np.array([0, 0, HEADS, HEAD_DIM], np.int64))
    merge = const("merge_shape", np.array([0, 0, HIDDEN], np.int64))
    if packed_qkv:
        const("w_qkv", rng.standard_normal((HIDDEN, 3 * HIDDEN)).astype(np.float32) / 4)
        const("b_qkv", rng.standard_normal(3 * HIDDEN).astype(np.float32) / 4)
        nodes += [
            helper.make_node("MatMul", ["x", "w_qkv"], ["qkv_mm"]),
            helper.make_node("Add", ["qkv_mm", "b_qkv"], ["qkv"]),
            helper.make_node("Split", ["qkv"], ["q_proj", "k_proj", "v_proj"], axis=-1, num_outputs=3),
        ]
    for name in ("q", "k", "v"):
        if not packed_qkv:
            const(f"w_{name}", rng.standard_normal((HIDDEN, HIDDEN)).astype(np.float32) / 4)
            const(f"b_{name}", rng.standard_normal(HIDDEN).astype(np.float32) / 4)
            source = "x" if name == "q" else kv_source
            nodes += [
                helper.make_node("MatMul", [source, f"w_{name}"], [f"{name}_mm"]),
                helper.make_node("Add", [f"{name}_mm", f"b_{name}"], [f"{name}_proj"]),
            ]
        nodes.append(helper.make_node("Reshape", [f"{name}_proj", split], [f"{name}_split"]))
    nodes += [
        helper.make_node("Transpose", ["q_split"], ["q"], perm=[0, 2, 1, 3]),
        helper.make_node("Transpose", ["k_split"], ["k_t"], perm=[0, 2, 3, 1]),
        helper.make_node("Transpose", ["v_split"], ["v"], perm=[0, 2, 1, 3]),
    ]
    q, k_t = "q", "k_t"
    if scale_where == "qk":
        root = const("root_scale", np.array(HEAD_DIM**-0.25, np.float32))
        nodes += [
            helper.make_node("Mul", [q, root], ["q_scaled"]),
            helper.make_node("Mul", [k_t, root], ["k_scaled"]),
        ]
        q, k_t = "q_scaled", "k_scaled"
    nodes.append(helper.make_node("MatMul", [q, k_t], ["qk"]))
    scores = "qk"
    if scale_where == "scores":
        nodes.append(
            helper.make_node(
                "Div", [scores, const("sqrt_d", np.array(HEAD_DIM**0.5, np.float32))], ["scaled"]
            )
        )
        scores = "scaled"
    if softcap:
        cap = const("cap", np.array(softcap, np.float32))
        nodes += [
            helper.make_node("Div", [scores, cap], ["uncapped"]),
            helper.make_node("Tanh", ["uncapped"], ["tanh"]),
            helper.make_node("Mul", ["tanh", cap], ["capped"]),
        ]
        scores = "capped"
    if mask != "none":
        nodes.append(
            helper.make_node(
                "Unsqueeze", ["attention_mask", const("axes", np.array([1, 2], np.int64))], ["mask4"]
            )
        )
    if mask == "add":
        nodes += [
            helper.make_node("Cast", ["mask4"], ["mask_f"], to=TensorProto.FLOAT),
            helper.make_node("Sub", [const("one", np.array(1.0, np.float32)), "mask_f"], ["inverted"]),
            helper.make_node("Mul", ["inverted", const("min", np.array(MIN, np.float32))], ["bias"]),
            helper.make_node("Add", [scores, "bias"], ["masked"]),
        ]
        scores = "masked"
    elif mask == "where":
        nodes += [
            helper.make_node("Cast", ["mask4"], ["mask_b"], to=TensorProto.BOOL),
            helper.make_node(
                "Where", ["mask_b", scores, const("fill", np.array(MIN, np.float32))], ["masked"]
            ),
        ]
        scores = "masked"
    softmax_input = scores if with_softmax_input_from_matmul else "x4"
    if not with_softmax_input_from_matmul:
        nodes.append(helper.make_node("Reshape", ["x", split], ["x4"]))
    nodes.append(helper.make_node("Softmax", [softmax_input], ["probs"], axis=softmax_axis))
    probs = "probs"
    if nan_guard:
        nodes += [
            helper.make_node("IsNaN", [probs], ["nan"]),
            helper.make_node("Where", ["nan", const("zero", np.array(0.0, np.float32)), probs], ["guarded"]),
        ]
        probs = "guarded"
    value = "v" if with_softmax_input_from_matmul else "x4"
    nodes += [
        helper.make_node("MatMul", [probs, value], ["context"]),
        helper.make_node("Transpose", ["context"], ["context_t"], perm=[0, 2, 1, 3]),
        helper.make_node("Reshape", ["context_t", merge], ["y"]),
    ]
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", "seq", HIDDEN])]
    if extra_output:
        outputs.append(
            helper.make_tensor_value_info(extra_output, TensorProto.FLOAT, ["batch", HEADS, "seq", "seq"])
        )
    graph = helper.make_graph(
        nodes,
        "attention",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "seq", HIDDEN]),
            helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch", "seq"]),
            *(
                [helper.make_tensor_value_info("memory", TensorProto.FLOAT, ["batch", "seq", HIDDEN])]
                if kv_source == "memory"
                else []
            ),
        ],
        outputs,
        inits,
    )
    return checked_model(graph)


def checked_model(graph: onnx.GraphProto, opset: int = 18) -> onnx.ModelProto:
    """A hand-built graph as a model the ONNX checker accepts."""
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 9
    onnx.checker.check_model(model)
    return model


def feeds(batch: int = BATCH, seq: int = SEQ) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(1)
    mask = np.ones((batch, seq), np.int64)
    mask[1:, seq - seq // 3 :] = 0
    return {
        "x": rng.standard_normal((batch, seq, HIDDEN)).astype(np.float32),
        "attention_mask": mask,
        "memory": rng.standard_normal((batch, seq, HIDDEN)).astype(np.float32),
    }


def run_pass(
    pass_class, model: onnx.ModelProto, options: dict | None = None, context_feeds=None, target: str = "cpu"
):
    """Apply one pass to a copy; return (the pass, the new proto)."""
    working = ir.serde.deserialize_model(model)
    context = PassContext(
        target=target, feeds=feeds() if context_feeds is None else context_feeds, flags=options or {}
    )
    tx_pass = pass_class(context)
    result = tx_pass(working)
    return tx_pass, ir.serde.serialize_model(result.model)


def max_diff(a: onnx.ModelProto, b: onnx.ModelProto, inputs: dict[str, np.ndarray]) -> float:
    """|a - b| with ORT optimizations off, so the graphs are compared as written."""
    first = rt.run(rt.create_session(a, optimize=False), inputs)
    second = rt.run(rt.create_session(b, optimize=False), inputs)
    return rt.max_abs_diff(first, second)


def op_types(model: onnx.ModelProto) -> list[str]:
    return [n.op_type for n in model.graph.node]


def heads_first(model: onnx.ModelProto, which: str) -> onnx.ModelProto:
    """Q or K worked on in the head-split [B, N, S, D] form (a Relu there, as rotary embeddings do
    in LLaMA): the graph then has no [B, S, hidden] tensor the fused op could read directly.
    ``which`` is "q" (Q = Relu(split Q)) or "k" (Kᵀ = Transpose(0, 1, 3, 2)(Relu(split K)))."""
    nodes = list(model.graph.node)
    if which == "q":
        index = next(i for i, n in enumerate(nodes) if list(n.output) == ["q"])
        nodes[index].output[0] = "q4"
        added = [helper.make_node("Relu", ["q4"], ["q"])]
    else:
        index = next(i for i, n in enumerate(nodes) if list(n.output) == ["k_t"])
        transpose = nodes[index]
        transpose.output[0] = "k4"
        del transpose.attribute[:]
        transpose.attribute.append(helper.make_attribute("perm", [0, 2, 1, 3]))
        added = [
            helper.make_node("Relu", ["k4"], ["k4r"]),
            helper.make_node("Transpose", ["k4r"], ["k_t"], perm=[0, 1, 3, 2]),
        ]
    del model.graph.node[:]
    model.graph.node.extend(nodes[: index + 1] + added + nodes[index + 1 :])
    onnx.checker.check_model(model)
    return model


def causal(model: onnx.ModelProto, seq: int = SEQ) -> onnx.ModelProto:
    """Add a causal mask (a constant [1, 1, S, S] bias) to the scores before the Softmax:
    with the padding mask, exactly the "causal ∧ key is not padding" GroupQueryAttention applies."""
    softmax = next(n for n in model.graph.node if n.op_type == "Softmax")
    scores = softmax.input[0]
    bias = np.where(np.tril(np.ones((seq, seq), bool)), 0.0, MIN).astype(np.float32)[None, None]
    model.graph.initializer.append(numpy_helper.from_array(bias, "causal_bias"))
    softmax.input[0] = "causal_scores"
    index = list(model.graph.node).index(softmax)
    model.graph.node.insert(index, helper.make_node("Add", [scores, "causal_bias"], ["causal_scores"]))
    onnx.checker.check_model(model)
    return model


def add_output(model: onnx.ModelProto, name: str) -> onnx.ModelProto:
    """Make an intermediate a graph output too (another consumer of that value)."""
    model.graph.output.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, None))
    return model
