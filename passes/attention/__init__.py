"""The attention family: attention sites read once, then lowered to the op the target runs.

Passes: ``fuse-embed-layernorm`` (embed_layernorm.py; sites embed_sites.py), ``fuse-rotary``
(rotary.py; sites rotary_sites.py), ``fuse-attention`` (fusion.py), ``fuse-activations``
(activations.py: onnxscript pattern rules), ``remove-padding`` (remove_padding.py).

One import line per module. ``PASSES`` and ``RULES`` (rule name → class: the names in
``rule_counts`` and node metadata) are collected from what the lines import, so a module
joins the family by adding its line. ``fuse-attention`` (fusion.py) reads each site
(read.py: ``read-attention``, the rule unfused sites are recorded under) and lowers it
(lower_*.py), applying the bias rules of bias.py and Q's head merge (output.py) inside.
"""
# ruff: noqa: F401  (the imports are the family's list; __all__ is collected from them)

from txcompile.passes.base import TxPass as _TxPass

from .activations import FuseActivations
from .bias import AttentionBias, FoldProjectionBias
from .embed_layernorm import EmbedLayerNormRule, FuseEmbedLayerNorm
from .fusion import FuseAttention, LowerAttention
from .lower_gqa import CachePaddingBias, GroupQueryAttention
from .lower_ms import MultiHeadAttentionBnsh, MultiHeadAttentionBsh
from .lower_onnx import OnnxAttention, OnnxAttentionBsh
from .lower_packed import OnnxAttentionMatMul, PackedAttention, PackedMatMul
from .output import QueryMergeHeads
from .read import ReadAttention
from .remove_padding import RemovePadding
from .rotary import FuseRotary, RotaryRule

_CLASSES = [v for k, v in dict(globals()).items() if isinstance(v, type) and not k.startswith("_")]
PASSES = tuple(c for c in _CLASSES if issubclass(c, _TxPass))
RULES = {
    c.name: c for c in _CLASSES if not issubclass(c, _TxPass) and isinstance(getattr(c, "name", None), str)
}
__all__ = ["PASSES", "RULES", *(c.__name__ for c in _CLASSES)]
