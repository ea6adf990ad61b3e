"""When an attention site may become com.microsoft.GroupQueryAttention, and with what K/V
(the checks behind the ``gqa`` lowering rule in lower_gqa.py).

GroupQueryAttention reads K/V with their own (fewer) heads and applies the causal mask itself,
plus the padding as one valid length per row (``seqlens_k``) — right padding, as ORT's kernel
defines it. So a site qualifies only when (1) its K/V are the graph's repeat of fewer heads
(LLaMA's ``repeat_kv``: Reshape(Expand(Unsqueeze(kv, 2)))) or are not repeated at all, and
(2) its additive bias, evaluated on the verification inputs, is exactly "causal, and the key is
not padding" — nothing else added, no other mask. The check is numeric because exporters
build that mask in too many ways to read structurally; the inputs must pad some rows, or it
could not tell a padding mask from none.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import onnx_ir as ir

from txcompile.graph.constants import constant_array
from txcompile.graph.probe import Shapes
from txcompile.passes.attention.sites import Site

BLOCKED = -1e4  # an additive bias at or below this blocks the key (exporters write -inf or dtype min)


def unrepeated(value: ir.Value, batch: int, heads: int, keys: int, head_dim: int, shapes: Shapes):
    """(kv [B, KV, L, D], KV) behind ``repeat_kv``, or (value, heads) when nothing repeats it."""
    reshape = value.producer()
    expand = reshape.inputs[0].producer() if reshape is not None and reshape.op_type == "Reshape" else None
    unsqueeze = expand.inputs[0].producer() if expand is not None and expand.op_type == "Expand" else None
    if unsqueeze is None or unsqueeze.op_type != "Unsqueeze" or not _axes_are(unsqueeze, [2]):
        return value, heads
    kv = unsqueeze.inputs[0]
    shape = shapes(kv)
    if shape is None or len(shape) != 4 or heads % shape[1]:
        return value, heads
    kv_heads = shape[1]
    if shape != (batch, kv_heads, keys, head_dim):
        return value, heads
    if shapes(expand.outputs[0]) != (batch, kv_heads, heads // kv_heads, keys, head_dim):
        return value, heads
    return kv, kv_heads


def _axes_are(unsqueeze: ir.Node, axes: list[int]) -> bool:
    """Unsqueeze's axes: an input since opset 13, an attribute before."""
    if len(unsqueeze.inputs) > 1 and unsqueeze.inputs[1] is not None:
        array = constant_array(unsqueeze.inputs[1])
        return array is not None and array.tolist() == axes
    attribute = unsqueeze.attributes.get_ints("axes")
    return attribute is not None and list(attribute) == axes


def cached(value: ir.Value) -> tuple[ir.Value, ir.Value] | None:
    """(past, new) when ``value`` is Concat(past, new) along the sequence axis of [B, KV, L, D]
    with ``past`` a graph input: a decoder's KV cache (the Concat's output is its present)."""
    concat = value.producer()
    if concat is None or concat.op_type != "Concat" or len(concat.inputs) != 2:
        return None
    if concat.attributes.get_int("axis", 0) not in (2, -2):
        return None
    past, new = concat.inputs
    if past is None or past.producer() is not None or past.const_value is not None:
        return None
    return past, new


def causal_reason(site: Site, seq: int, keys: int, values: Mapping[str, np.ndarray]) -> str | None:
    """None when the site's mask blocks every key after the query's own position (counting
    the past: query i is at keys − seq + i), as GroupQueryAttention's own causal mask does;
    what else it blocks (padding, a sliding window) goes in as the op's attention bias."""
    if not site.biases:
        return "no causal mask"
    if any(term.value.name not in values for term in site.biases):
        return "mask could not be evaluated"
    total = np.asarray(sum(term.added(values[term.value.name]) for term in site.biases))
    if total.ndim > 4 or total.shape[-2:] != (seq, keys):
        return f"mask of shape {total.shape} is not [.., {seq}, {keys}]"
    allowed = total > BLOCKED
    causal = np.tril(np.ones((seq, keys), bool), keys - seq)
    return None if not np.any(allowed & ~causal) else "mask lets a query see keys after it (not causal)"


def padding_input(feeds: Mapping[str, np.ndarray]) -> tuple[str | None, str | None]:
    """(name of the 2-D attention-mask input or None, reason it cannot be used)."""
    masks = [name for name, value in feeds.items() if value.ndim == 2 and "mask" in name.lower()]
    if len(masks) > 1:
        return None, f"several 2-D mask inputs ({', '.join(masks)})"
    return (masks[0] if masks else None), None


def causal_padding_reason(
    site: Site,
    seq: int,
    keys: int,
    values: Mapping[str, np.ndarray],
    feeds: Mapping[str, np.ndarray],
    mask_name: str | None,
) -> str | None:
    """None when the site's bias is exactly causal ∧ key-not-padding on ``feeds``, else why not."""
    if not site.biases:
        return "no causal mask"
    allowed = _allowed_keys(site, values)
    if isinstance(allowed, str):
        return allowed
    if seq != keys:
        return f"queries ({seq}) and keys ({keys}) differ in length"
    causal = np.tril(np.ones((seq, keys), bool))[None, None]
    if mask_name is None:
        return None if _same(allowed, causal) else "mask is not causal"
    keep = np.asarray(feeds[mask_name]) > 0
    if keep.all():
        return f"the verification inputs do not pad {mask_name}: cannot tell how the mask reaches this site"
    if not np.all(keep[:, :1]) or np.any(np.diff(keep.astype(np.int8), axis=1) > 0):
        return f"{mask_name} is not right-padded in the verification inputs"
    return None if _same(allowed, causal & keep[:, None, None, :]) else "mask is not causal ∧ padding"


def cache_padding_reason(
    site: Site,
    seq: int,
    keys: int,
    values: Mapping[str, np.ndarray],
    feeds: Mapping[str, np.ndarray],
    mask_name: str,
) -> str | None:
    """None when the site's bias is exactly causal (counting the past) ∧ key-not-padding on
    ``feeds``: what a bias of the padding alone gives beside GroupQueryAttention's own causal mask."""
    allowed = _allowed_keys(site, values)
    if isinstance(allowed, str):
        return allowed
    keep = np.asarray(feeds[mask_name]) > 0
    if keep.ndim != 2 or keep.shape[1] != keys:
        return f"{mask_name} is not [batch, {keys}] in the verification inputs"
    if keep.all():
        return f"the verification inputs do not pad {mask_name}: cannot tell how the mask reaches this site"
    causal = np.tril(np.ones((seq, keys), bool), keys - seq)[None, None]
    return None if _same(allowed, causal & keep[:, None, None, :]) else "mask is not causal ∧ padding"


def _allowed_keys(site: Site, values: Mapping[str, np.ndarray]) -> np.ndarray | str:
    """[B|1, N|1, S, L]: which keys the site's mask lets each query see on the probed values —
    or why that cannot be read, or why more than a mask is added."""
    if any(term.value.name not in values for term in site.biases):
        return "mask could not be evaluated"
    total = np.asarray(sum(term.added(values[term.value.name]) for term in site.biases))
    if total.ndim > 4:
        return "mask has more than 4 axes"
    total = total.reshape((1,) * (4 - total.ndim) + total.shape)
    allowed = total > BLOCKED
    if np.any(total[allowed] != 0):
        return "an additive bias besides the mask (GroupQueryAttention takes none)"
    return allowed


def _same(a: np.ndarray, b: np.ndarray) -> bool:
    try:
        shape = np.broadcast_shapes(a.shape, b.shape)
    except ValueError:
        return False
    return bool(np.array_equal(np.broadcast_to(a, shape), np.broadcast_to(b, shape)))
