"""The foundation's one graph builder and constant readers."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from txcompile.graph import ort as rt
from txcompile.graph.build import GraphBuilder
from txcompile.graph.constants import constant_array, constant_scalar, is_constant


def _graph() -> tuple[ir.Graph, ir.Value]:
    x = ir.val("x", ir.DataType.FLOAT, ir.Shape([2, 3]))
    return ir.Graph([x], [], nodes=[], opset_imports={"": 18}, name="g"), x


def test_builder_makes_a_runnable_graph_with_typed_constants():
    graph, x = _graph()
    b = GraphBuilder(graph, "site")
    scaled = b.op("Mul", x, b.const(2.0))
    shape = b.const(np.array([3, 2], np.int64))
    y = b.op("Transpose", b.op("Reshape", scaled, shape), perm=[1, 0])
    assert graph.num_nodes() == 0  # nothing lands before commit
    made = b.commit()
    assert [n.op_type for n in made] == ["Mul", "Reshape", "Transpose"]
    assert shape.dtype == ir.DataType.INT64 and graph.initializers["site/c1"].dtype == ir.DataType.FLOAT
    y.name = "y"
    graph.outputs.append(y)
    proto = ir.serde.serialize_model(ir.Model(graph, ir_version=10))
    value = np.arange(6, dtype=np.float32).reshape(2, 3)
    (out,) = rt.run(rt.create_session(proto, "cpu"), {"x": value}).values()
    np.testing.assert_array_equal(out, (2 * value).reshape(3, 2).T)


def test_builder_names_are_unique_and_the_same_on_every_run():
    def build() -> list[str]:
        graph, x = _graph()
        for _ in range(2):  # two builders with one prefix must not collide
            b = GraphBuilder(graph, "p")
            b.op("Add", x, b.const(1.0))
            b.commit()
        return sorted(graph.initializers)

    assert build() == build() == ["p/c1", "p/c2"]


def test_builder_inserts_before_its_anchor_and_counts_outside_uses():
    graph, x = _graph()
    last = ir.node("Neg", [x], name="last")
    graph.append(last)
    b = GraphBuilder(graph, "p", anchor=last)
    mine = b.op("Abs", x)
    b.op("Relu", mine)
    assert b.outside_uses(x) == 1 and b.outside_uses(mine) == 0
    b.commit()
    assert [n.op_type for n in graph] == ["Abs", "Relu", "Neg"]


def test_builder_ops_with_several_outputs_and_a_domain():
    graph, x = _graph()
    outputs = GraphBuilder(graph, "p").ops("Split", [x], {"axis": 1, "num_outputs": 3}, outputs=3)
    assert len(outputs) == 3 and outputs[0].producer().attributes["axis"].value == 1
    node = GraphBuilder(graph, "q").op("Gelu", x, domain="com.microsoft").producer()
    assert node.domain == "com.microsoft"


def test_constants_read_initializers_and_constant_nodes_and_refuse_the_rest():
    graph, x = _graph()
    b = GraphBuilder(graph, "p")
    init = b.const(np.array([0.125], np.float32))
    node_out = b.op("Constant", value=ir.tensor(np.array([[1, 2]], np.int64)))
    computed = b.op("Neg", x)
    assert is_constant(None) and is_constant(init) and is_constant(node_out) and not is_constant(computed)
    assert constant_scalar(init) == 0.125
    np.testing.assert_array_equal(constant_array(node_out), [[1, 2]])
    assert constant_scalar(node_out) is None  # two elements: not a scalar
    assert constant_array(computed) is None and constant_array(None) is None
