"""HE-friendly (polynomial-only) form of a transformer: calibrate, approximate, check the contract.

Passes: ``he-polynomial`` (:class:`PolynomialForm`, rewrite.py), ``he-contract``
(:class:`CheckContract`, contract.py), ``he-depth`` (:class:`HeDepth`, depth.py).

The rules of he-polynomial, one module each (``RULES``: rule name → class), all on
:class:`.site_rule.SiteRule` and the shared :class:`.state.PolyState`:

- elementwise.py  ``{op}-chebyshev``        GELU (erf, tanh forms), erf, tanh, sigmoid, exp
- softmax.py      ``softmax-exp-newton``    exp + Newton reciprocal, normalize-and-square
- power_softmax.py ``power-softmax``        x^p / Σ x^p (``--he-mode power-softmax``)
- layernorm.py    ``layernorm-newton-isqrt`` centering + Newton 1/√
- inverses.py     ``invsqrt-newton``, ``sqrt-newton``, ``reciprocal-newton``

Before the rules, prepare.py normalizes the graph (``nan-guard``, ``div-by-constant``,
``patch-conv``). The arithmetic the rules are written in: approx.py (``NumpyArith``,
``LevelArith``), emit.py (``OnnxArith``), composite.py, inverse.py; range calibration:
calibrate.py; pre-scaling folded into producers: fold.py.
"""

from .contract import CheckContract
from .depth import HeDepth
from .elementwise import ElementwiseRule
from .inverses import InvSqrtRule, ReciprocalRule, SqrtRule
from .layernorm import LayerNormRule
from .power_softmax import PowerSoftmaxRule
from .rewrite import PolynomialForm
from .softmax import SoftmaxRule

PASSES = (PolynomialForm, CheckContract, HeDepth)
RULES = {rule.name: rule for rule in PolynomialForm.rules}

__all__ = [
    "PASSES",
    "RULES",
    "CheckContract",
    "ElementwiseRule",
    "HeDepth",
    "InvSqrtRule",
    "LayerNormRule",
    "PolynomialForm",
    "PowerSoftmaxRule",
    "ReciprocalRule",
    "SoftmaxRule",
    "SqrtRule",
]
