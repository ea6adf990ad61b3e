"""Weights a shape probe does not need: made by ConstantOfShape where their values cannot
reach a shape.

A probe that only wants shapes (heads, head size) runs the whole graph, and every weight it
reads comes into memory beside the pipeline's own. Where a weight's values only flow through
ops whose output shapes depend on their inputs' shapes alone — MatMul, Add, LayerNorm, a
Reshape's data, … — zeros of the same shape give the same shapes. ONNX Runtime then builds each
one just before its readers and frees it after them: the probe holds activations, not weights.
Any other use (a shape argument, an index, a cast to integers, control flow, an op not listed
here) leaves the graph as it is.
"""

from __future__ import annotations

import collections

import numpy as np
import onnx

MIN_BYTES = 64 * 1024  # below this, a weight costs less than the node that would replace it
FLOATS = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE}
ALL = None  # every input slot takes weight-derived values
STOP = "stop"  # the output depends on the input's shape only: nothing to follow

_ELEMENTWISE = (  # float in, float out; or bool out, which only Where and logic read here
    "Abs Add And Ceil Clip Cos Div Dropout Elu Equal Erf Exp Floor Gelu Greater GreaterOrEqual "
    "HardSigmoid HardSwish Identity IsInf IsNaN LeakyRelu Less LessOrEqual Log Max Mean Min Mul "
    "Neg Not Or PRelu Pow Reciprocal Relu Round Selu Sigmoid Sign Sin Softplus Softsign Sqrt Sub "
    "Sum Tanh Trilu Where Xor"
)
_ALL_SLOTS = (
    "BatchNormalization Concat Conv ConvTranspose Einsum Gemm GroupNormalization "
    "InstanceNormalization LayerNormalization LogSoftmax MatMul RMSNormalization Softmax Transpose "
    "Flatten"
)
_DATA_SLOT = (  # slot 0 is data; the others are shapes, axes or indices
    "Expand Gather GatherElements GatherND Pad ReduceL2 ReduceMax ReduceMean ReduceMin ReduceProd "
    "ReduceSum Reshape Slice Split Squeeze Tile Unsqueeze"
)
_CONTRIB = (  # com.microsoft ops txcompile writes; their weight inputs are data
    "Attention BiasAdd BiasGelu EmbedLayerNormalization FastGelu FusedMatMul Gelu GroupQueryAttention "
    "MultiHeadAttention QuickGelu RotaryEmbedding SimplifiedLayerNormalization "
    "SkipLayerNormalization SkipSimplifiedLayerNormalization"
)
ALLOWED: dict[tuple[str, str], object] = {
    **{("", op): ALL for op in (_ELEMENTWISE + " " + _ALL_SLOTS).split()},
    **{("", op): {0} for op in _DATA_SLOT.split()},
    ("", "Cast"): {0},  # to a float type only (checked): integers from weights could divide by 0
    ("", "Shape"): STOP,
    ("", "Size"): STOP,
    **{("com.microsoft", op): ALL for op in _CONTRIB.split()},
    ("", "SimplifiedLayerNormalization"): ALL,  # onnxruntime's, in the default domain
}


def replace_weights(proto: onnx.ModelProto) -> int:
    """Replace, in place, the float weights of ≥ MIN_BYTES whose values cannot reach a shape by
    ConstantOfShape zeros; the number replaced (0 when any weight's use is not listed)."""
    graph = proto.graph
    opset = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), 0)
    if opset < 9 or has_subgraphs(graph):
        return 0
    fed = {i.name for i in graph.input}
    chosen = {t.name: i for i, t in enumerate(graph.initializer) if _replaceable(t, fed)}
    if not chosen or not _shape_free(graph, chosen):
        return 0
    made = []
    for index in sorted(chosen.values(), reverse=True):
        tensor = graph.initializer[index]
        shape = onnx.numpy_helper.from_array(np.array(tensor.dims, np.int64), f"{tensor.name}__probe_shape")
        zero = onnx.helper.make_tensor("value", tensor.data_type, [1], [0])
        made.append(
            (shape, onnx.helper.make_node("ConstantOfShape", [shape.name], [tensor.name], value=zero))
        )
        del graph.initializer[index]
    graph.initializer.extend(shape for shape, _ in made)
    nodes = [node for _, node in made] + list(graph.node)
    del graph.node[:]
    graph.node.extend(nodes)
    return len(made)


def has_subgraphs(graph: onnx.GraphProto) -> bool:
    """Whether a node holds a graph (If, Loop, Scan): its body reads outer names unseen here."""
    return any(
        a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS)
        for n in graph.node
        for a in n.attribute
    )


def _replaceable(tensor: onnx.TensorProto, fed: set[str]) -> bool:
    if tensor.data_type not in FLOATS or tensor.name in fed or tensor.HasField("segment"):
        return False
    itemsize = onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize
    return int(np.prod(tensor.dims, dtype=np.int64)) * itemsize >= MIN_BYTES


def _shape_free(graph: onnx.GraphProto, weights) -> bool:
    """Whether every value computed from ``weights`` reaches only listed (op, input) slots."""
    readers = collections.defaultdict(list)
    for node in graph.node:
        for slot, name in enumerate(node.input):
            if name:
                readers[name].append((node, slot))
    reached, todo = set(weights), list(weights)
    while todo:
        for node, slot in readers[todo.pop()]:
            rule = ALLOWED.get((node.domain if node.domain != "ai.onnx" else "", node.op_type), False)
            if rule is STOP:
                continue
            if rule is False or (rule is not ALL and slot not in rule) or not _float_cast(node):
                return False
            for name in node.output:
                if name and name not in reached:
                    reached.add(name)
                    todo.append(name)
    return True


def _float_cast(node: onnx.NodeProto) -> bool:
    if node.op_type != "Cast":
        return True
    return any(a.name == "to" and a.i in FLOATS for a in node.attribute)
