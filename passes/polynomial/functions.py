"""The non-linearities as float64 functions, with the parity that halves their polynomials."""

from __future__ import annotations

import math

import numpy as np

_erf = np.vectorize(math.erf, otypes=[float])


def erf(x):
    return _erf(x)


def gelu_even(x):
    """GELU(x) − x/2 = x·erf(x/√2)/2: even, so only even Chebyshev terms."""
    return 0.5 * x * erf(x / math.sqrt(2.0))


def gelu_tanh_even(x):
    return 0.5 * x * np.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3))


def sigmoid_odd(x):
    """σ(x) − ½ is odd."""
    return 1.0 / (1.0 + np.exp(-x)) - 0.5


# name → (function, parity, constant added back, x/2 added back)
ELEMENTWISE = {
    "Erf": (erf, "odd", 0.0, False),
    "Tanh": (np.tanh, "odd", 0.0, False),
    "Sigmoid": (sigmoid_odd, "odd", 0.5, False),
    "Exp": (np.exp, "", 0.0, False),
    "Gelu": (gelu_even, "even", 0.0, True),
    "Gelu:tanh": (gelu_tanh_even, "even", 0.0, True),
}
