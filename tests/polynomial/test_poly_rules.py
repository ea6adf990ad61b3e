"""The three DESIGN.md tests per he-polynomial rule: a match, a non-match with its reason, and a
value the rewrite reads that has another consumer (kept intact, the graph numerically equal)."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

from txcompile.graph import ort as rt
from txcompile.graph.errors import TxError
from txcompile.graph.nodes import RULE_KEY
from txcompile.passes.base import PassContext
from txcompile.passes.polynomial import RULES, PolynomialForm
from txcompile.passes.polynomial.site_rule import PLAINTEXT

from .graphs import HIDDEN, feeds_for, linear, model, op_types, out, polynomial, weight, x_input


def _positive(nodes, inits, source="x", target="v"):
    """v = source² + 1 (> 0 everywhere), for the inverses."""
    nodes += [
        helper.make_node("Mul", [source, source], [f"{target}.sq"], name=f"{target}_sq"),
        helper.make_node("Add", [f"{target}.sq", "one"], [target], name=f"{target}_add"),
    ]
    inits.append(helper.make_tensor("one", TensorProto.FLOAT, [], [1.0]))


def _site_graph(rule: str, shared: bool = False):
    """One site of ``rule`` on ciphertext; ``shared``: the value it reads is also an output."""
    nodes, inits = linear("l", "x", "h")
    outputs = [out("y")]
    if rule == "gelu-chebyshev":
        nodes.append(helper.make_node("Gelu", ["h"], ["y"], name="site"))
        read = "h"
    elif rule in ("softmax-exp-newton", "power-softmax"):
        nodes.append(helper.make_node("Softmax", ["h"], ["y"], axis=-1, name="site"))
        read = "h"
    elif rule == "layernorm-newton-isqrt":
        nodes.append(helper.make_node("LayerNormalization", ["h", "g", "b"], ["y"], name="site"))
        inits += [weight("g", (HIDDEN,), 0.1), weight("b", (HIDDEN,), 0.1)]
        read = "h"
    elif rule == "invsqrt-newton":
        _positive(nodes, inits, "h")
        nodes += [
            helper.make_node("Sqrt", ["v"], ["rt"], name="sqrt"),
            helper.make_node("Div", ["h", "rt"], ["y"], name="site"),
        ]
        read = "v"
    else:  # sqrt-newton, reciprocal-newton
        _positive(nodes, inits, "h")
        op = "Sqrt" if rule == "sqrt-newton" else "Reciprocal"
        nodes.append(helper.make_node(op, ["v"], ["y"], name="site"))
        read = "v"
    if shared:
        outputs.append(out(read))
    return model(nodes, [x_input()], outputs, inits), read


def _options(rule: str) -> dict:
    return {"he_mode": "power-softmax"} if rule == "power-softmax" else {}


def _tags(proto) -> set[str]:
    return {p.value for n in proto.graph.node for p in n.metadata_props if p.key == RULE_KEY}


def _run(proto, name: str) -> np.ndarray:
    return rt.run(rt.create_session(proto, optimize=False), feeds_for(proto))[name]


MATCHED = [
    "gelu-chebyshev",
    "softmax-exp-newton",
    "power-softmax",
    "layernorm-newton-isqrt",
    "invsqrt-newton",
    "sqrt-newton",
    "reciprocal-newton",
]


def test_every_rule_is_listed_in_the_family():
    # the elementwise rule is named per op ("gelu-chebyshev"); the family lists it once
    assert set(RULES) == {"chebyshev", *MATCHED[1:]}
    assert tuple(RULES.values()) == PolynomialForm.rules


OPS = {"gelu-chebyshev": "Gelu", "softmax-exp-newton": "Softmax", "power-softmax": "Softmax"}
OPS |= {"layernorm-newton-isqrt": "LayerNormalization", "invsqrt-newton": "Div", "sqrt-newton": "Sqrt"}
OPS |= {"reciprocal-newton": "Reciprocal"}


@pytest.mark.parametrize("rule", MATCHED)
def test_rule_matches_and_rewrites(rule):
    proto, _ = _site_graph(rule)
    result, record = polynomial(proto, **_options(rule))
    (site,) = record.details["sites"]
    assert (site["site"], site["rule"], site["status"], site["op"], site["reason"]) == (
        "site",
        rule,
        "fused",
        OPS[rule],
        None,
    )
    assert record.rule_counts[rule] == 1 and rule in _tags(result.model)
    assert (record.details["fused"], record.details["unfused"]) == (1, 0)
    assert OPS[rule] not in op_types(result.model)
    assert result.records[1].status == "unchanged"  # the contract holds
    assert record.max_diff < (1.0 if rule == "power-softmax" else 5e-3)  # x^p/Σx^p is another function


def _plaintext_graph(op: str, **attrs):
    """The non-linearity reads a constant: plaintext, left for the clear computation."""
    nodes = [helper.make_node(op, ["c", *attrs.pop("inputs", [])], ["s"], name="plain", **attrs)]
    nodes.append(helper.make_node("Mul", ["x", "s"], ["y"], name="scale"))
    inits = [_positive_constant(), weight("g", (HIDDEN,), 0.1), weight("b", (HIDDEN,), 0.1)]
    return model(nodes, [x_input()], [out("y")], inits)


def _positive_constant():
    return numpy_helper.from_array(np.abs(numpy_helper.to_array(weight("c", (HIDDEN,)))) + 0.5, "c")


@pytest.mark.parametrize(
    ("op", "attrs", "rule"),
    [
        ("Tanh", {}, "tanh-chebyshev"),
        ("Softmax", {"axis": -1}, "softmax-exp-newton"),
        ("LayerNormalization", {"inputs": ["g", "b"]}, "layernorm-newton-isqrt"),
        ("Sqrt", {}, "sqrt-newton"),
        ("Reciprocal", {}, "reciprocal-newton"),
    ],
)
def test_plaintext_site_is_recorded_unfused(op, attrs, rule):
    result, record = polynomial(_plaintext_graph(op, **attrs))
    (site,) = record.details["sites"]
    assert (site["site"], site["rule"], site["status"], site["op"]) == ("plain", rule, "unfused", None)
    assert site["reason"] == PLAINTEXT == "plaintext input: no ciphertext reaches it, so it stays as it is"
    assert record.status == "unchanged" and op in op_types(result.model)
    assert (record.details["fused"], record.details["unfused"]) == (0, 1)
    assert record.details["per_nonlinearity"] == {}


def test_plaintext_softmax_under_power_mode():
    result, record = polynomial(_plaintext_graph("Softmax", axis=-1), he_mode="power-softmax")
    (site,) = record.details["sites"]
    assert (site["rule"], site["status"], site["reason"]) == ("power-softmax", "unfused", PLAINTEXT)


def _divided_by_plain_sqrt(numerator: str):
    nodes = [
        helper.make_node("Sqrt", ["c"], ["rt"], name="sqrt"),
        helper.make_node("Div", [numerator, "rt"], ["q"], name="div"),
        helper.make_node("Mul", ["x", "q"], ["y"], name="scale"),
    ]
    return model(nodes, [x_input()], [out("y")], [_positive_constant()])


def test_plaintext_divisor_is_not_an_inverse_site():
    """Div(c, Sqrt(c)): the Sqrt is only divided by, all plaintext: one unfused site."""
    _, record = polynomial(_divided_by_plain_sqrt("c"))
    assert [(s["site"], s["rule"], s["reason"]) for s in record.details["sites"]] == [
        ("div", "reciprocal-newton", PLAINTEXT)
    ]


def test_ciphertext_divided_by_plaintext_is_left_to_the_contract():
    """Div(x, Sqrt(c)): no rule divides a ciphertext by a computed plaintext; he-contract fails."""
    proto = _divided_by_plain_sqrt("x")
    with pytest.raises(TxError, match="Div node 'div': not an addition, multiplication"):
        polynomial(proto)
    tx_pass = PolynomialForm(PassContext("he", "cpu", feeds_for(proto), {}))
    tx_pass(ir.serde.deserialize_model(proto))
    (site,) = tx_pass.details["sites"]
    assert (site["rule"], site["status"]) == ("reciprocal-newton", "unfused")
    assert site["reason"] == "plaintext divisor of a ciphertext: no rule for it (he-contract reports the Div)"
    assert tx_pass.details["unsupported"] == [
        "Div node 'div': not an addition, multiplication or data movement"
    ]


def test_inverse_of_a_non_positive_value_is_a_contract_error():
    """invsqrt-newton refuses a value that reaches ≤ 0: no Newton domain holds it."""
    nodes, inits = linear("l", "x", "h")
    nodes += [
        helper.make_node("Sqrt", ["h"], ["rt"], name="sqrt"),
        helper.make_node("Div", ["x", "rt"], ["y"], name="site"),
    ]
    with pytest.raises(TxError, match=r"Div 'site': input reaches -[0-9.]+ ≤ 0 on calibration"):
        polynomial(model(nodes, [x_input()], [out("y")], inits))


def test_softmax_on_another_axis_is_a_contract_error():
    nodes, inits = linear("l", "x", "h")
    nodes.append(helper.make_node("Softmax", ["h"], ["y"], axis=1, name="site"))
    with pytest.raises(TxError, match=r"Softmax 'site': only the last axis is supported \(axis 1\)"):
        polynomial(model(nodes, [x_input()], [out("y")], inits))


def test_layernorm_with_computed_scale_is_a_contract_error():
    nodes, inits = linear("l", "x", "h")
    nodes.append(helper.make_node("LayerNormalization", ["h", "h", "b"], ["y"], name="site"))
    inits.append(weight("b", (HIDDEN,), 0.1))
    with pytest.raises(TxError, match="LayerNormalization 'site': input 1 must be a constant"):
        polynomial(model(nodes, [x_input()], [out("y")], inits))


@pytest.mark.parametrize("rule", MATCHED)
def test_shared_value_stays_intact(rule):
    """The value the rule reads also feeds a graph output: its producer is not scaled (the
    pre-scaling pays its multiply), the output keeps its exact values, the site still fuses."""
    proto, read = _site_graph(rule, shared=True)
    result, record = polynomial(proto, **_options(rule))
    site = next(s for s in record.details["sites"] if s["site"] == "site")
    assert site["status"] == "fused" and site["rule"] == rule
    if rule in ("softmax-exp-newton", "power-softmax"):
        # the bias is a plaintext addend, split off like a mask: the MatMul output under it has
        # one user, so the pre-scaling still folds into the weights without touching h
        assert site["prescale_folded"]
    elif "prescale_folded" in site:
        assert not site["prescale_folded"]
    else:
        assert site["centering_levels"] == 1
    assert np.array_equal(_run(proto, read), _run(result.model, read))
    assert record.max_diff < (1.0 if rule == "power-softmax" else 5e-3)
